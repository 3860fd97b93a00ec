"""From a model name to a ready model: find the files, read config and tokenizer, build the
architecture and fill its weights (safetensors, sharded safetensors, GGUF, or random "dummy")."""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch
# Imported here, once, under the import lock: engines built on several threads at once (one per
# served model) raced in transformers' lazy module ("cannot import name 'AutoConfig'").
from transformers import AutoConfig, AutoTokenizer

from engine.kernels.backend import get_attention_backend
from engine.models.prepack import prepack_linears, resolve_linear_backend
from engine.models.base import CausalLM
from engine.models.default_model import default_gguf_path
from engine.models.gguf_q4_1 import attach_q4_1
from engine.models.registry import model_class
from engine.models.tensor_parallel import TPContext
from engine.models.gguf_weights import open_gguf
from engine.models.weights import iter_safetensors
from engine.startup import choose_cpu_dtype

logger = logging.getLogger("conveyor.engine")

LOAD_FORMATS = ("auto", "dummy")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """Where a model lives: an HF checkpoint directory, or `gguf_file` inside directory `path`."""

    path: str
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    def hf_kwargs(self) -> dict:
        """Arguments telling transformers' from_pretrained which file to read."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(model: str | None) -> ModelSource:
    """None -> the default SmolLM2 GGUF; a directory with config.json -> HF checkpoint; a .gguf
    file, or a directory holding exactly one, -> GGUF. Anything else raises ValueError naming
    `model` (RuntimeError with an install hint when the default package is missing)."""
    if model is None:
        path = default_gguf_path()
        return ModelSource(os.path.dirname(path), os.path.basename(path))
    if not os.path.exists(model):
        raise ValueError(f"model {model!r} does not exist (expected a checkpoint directory or a .gguf file)")
    model = os.path.abspath(model)
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"model {model!r} is a file but not a .gguf file")
        return ModelSource(os.path.dirname(model), os.path.basename(model))
    if os.path.isfile(os.path.join(model, "config.json")):
        return ModelSource(model)
    ggufs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model, "*.gguf")))
    if len(ggufs) == 1:
        return ModelSource(model, ggufs[0])
    if ggufs:
        raise ValueError(f"model directory {model!r} holds several .gguf files {ggufs}; pass the file's path")
    raise ValueError(f"model directory {model!r} has neither a config.json nor a .gguf file")


def gguf_cache_dir(gguf_path: str) -> str:
    """Where the HF-format config and tokenizer converted from `gguf_path` are kept: under
    $CONVEYOR_CACHE_DIR, else $XDG_CACHE_HOME/conveyor, else ~/.cache/conveyor; keyed by the
    file's path, size and mtime and the transformers version, so a changed file or a
    transformers upgrade converts afresh."""
    import transformers

    base = os.environ.get("CONVEYOR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "conveyor")
    st = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(base, "gguf", f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


def _via_cache(kind: str, gguf_path: str, load_cached, convert):
    """`load_cached(dir)` from the cache when present; else `convert()` (reading the GGUF
    metadata takes tens of seconds on a small CPU), saved into the cache for next time. A cache
    that cannot be written is skipped, never an error."""
    folder = os.path.join(gguf_cache_dir(gguf_path), kind)
    if os.path.isdir(folder):
        try:
            return load_cached(folder)
        except (OSError, ValueError) as exc:
            logger.warning("ignoring the unreadable cached %s in %s: %s", kind, folder, exc)
    obj = convert()
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{kind}-", dir=os.path.dirname(folder))
        obj.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)  # atomic: a concurrent reader sees all of it or nothing
            logger.info("cached the %s converted from %s in %s", kind, os.path.basename(gguf_path), folder)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        logger.info("not caching the %s converted from the GGUF file: %s", kind, exc)
    return obj


def load_hf_config(src: ModelSource):
    """The transformers config (for GGUF sources converted from the file's metadata once, then
    read from `gguf_cache_dir`)."""
    if not src.is_gguf:
        return AutoConfig.from_pretrained(src.path)
    return _via_cache("config", os.path.join(src.path, src.gguf_file), AutoConfig.from_pretrained,
                      lambda: AutoConfig.from_pretrained(src.path, **src.hf_kwargs()))


def load_tokenizer(src: ModelSource, tokenizer: str | None = None):
    """The fast tokenizer (with chat template) of `src`, or of `tokenizer` (a directory or .gguf
    file) when given. Tokenizers of GGUF files are converted once and cached like the config."""
    if tokenizer is not None:
        if not os.path.exists(tokenizer):
            raise ValueError(f"tokenizer {tokenizer!r} does not exist")
        if tokenizer.endswith(".gguf"):
            return _via_cache("tokenizer", tokenizer, AutoTokenizer.from_pretrained,
                              lambda: AutoTokenizer.from_pretrained(os.path.dirname(tokenizer) or ".",
                                                                    gguf_file=os.path.basename(tokenizer)))
        return AutoTokenizer.from_pretrained(tokenizer)
    if not src.is_gguf:
        return AutoTokenizer.from_pretrained(src.path)
    return _via_cache("tokenizer", os.path.join(src.path, src.gguf_file), AutoTokenizer.from_pretrained,
                      lambda: AutoTokenizer.from_pretrained(src.path, **src.hf_kwargs()))


def resolve_dtype(dtype: str, hf_config, device: torch.device | str) -> torch.dtype:
    """Maps a dtype name to torch; an explicit name always wins. "auto" takes the checkpoint's
    dtype on GPU (bfloat16 when it names none, as GGUF files); on CPU it takes bfloat16 only
    where the CPU has fast bf16 kernels and float32 otherwise (`startup.choose_cpu_dtype`).
    The choice and its reason are logged."""
    if dtype in _DTYPES:
        logger.info("dtype: %s (asked for)", dtype)
        return _DTYPES[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    # read the attributes directly: transformers' `torch_dtype` property logs a deprecation
    fields = vars(hf_config)
    declared = fields.get("dtype") or fields.get("torch_dtype")
    if isinstance(declared, str):
        declared = _DTYPES.get(declared)
    if declared not in _DTYPES.values():
        declared = None
    if torch.device(device).type == "cpu":
        chosen, why = choose_cpu_dtype(declared)
    else:
        chosen = declared or torch.bfloat16
        why = "the checkpoint's dtype" if declared else "the checkpoint names no dtype"
    logger.info("dtype: %s (auto: %s; --dtype to change)", str(chosen).removeprefix("torch."), why)
    return chosen


def load_model(
    src: ModelSource,
    hf_config,
    dtype: torch.dtype,
    device: torch.device | str,
    attention_backend: str = "auto",
    load_format: str = "auto",
    seed: int = 0,
    tp: TPContext = TPContext(),
    linear_backend: str = "auto",
) -> CausalLM:
    """Builds the model for `hf_config`'s architecture on `device` in `dtype`, in eval mode with
    gradients off. load_format "dummy" fills deterministic random weights (from `seed`) and
    reads no weight files. With a tensor-parallel `tp` of size > 1 the model is this rank's
    shard: safetensors are opened lazily and only the rank's rows/columns of each sharded matrix
    are read (a GGUF tensor is dequantized whole, one tensor at a time, then sliced).
    `linear_backend` (engine/models/prepack.py): with oneDNN the projection weights are packed
    once here and their dense copies dropped."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device(device)
    linear, linear_why = resolve_linear_backend(linear_backend, dtype, device)
    cls = model_class(hf_config)
    backend = get_attention_backend(attention_backend, device)
    # Build on the meta device (no memory, no random init), then allocate uninitialised storage
    # directly in the target dtype: every parameter is overwritten below.
    start = time.perf_counter()
    what = "random (dummy) weights" if load_format == "dummy" else (
        src.gguf_file if src.is_gguf else "safetensors")
    logger.info("loading weights: %s %s from %s (%s, %s)", cls.__name__, what, src.path,
                str(dtype).removeprefix("torch."), device)
    with torch.device("meta"):
        model = cls(hf_config, backend, device, tp=tp)
    model = model.to(dtype=dtype).to_empty(device=device)
    if load_format == "dummy":
        model.init_dummy_weights(seed)
    elif src.is_gguf:
        gguf_path = os.path.join(src.path, src.gguf_file)
        gguf_file = open_gguf(gguf_path, hf_config, cache_dir=gguf_cache_dir(gguf_path))
        # Q4_1 projections run from their blocks (own GEMM only): never dequantized to float32
        taken = attach_q4_1(model, gguf_file, device) if linear == "cpu" else set()
        model.load_weights(gguf_file.dequantized(dtype, skip=taken))
    else:
        model.load_weights(iter_safetensors(src.path, lazy=tp.size > 1))
    model.eval()
    model.requires_grad_(False)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("weights loaded: %.0f MiB in %.1f s", size / (1 << 20), time.perf_counter() - start)
    model.linear_backend, model.attention_backend = linear, backend.name
    if linear in ("onednn", "cpu"):
        start = time.perf_counter()
        n = prepack_linears(model, linear)
        logger.info("linear layers: %s, %d weights packed in %.1f s (%s; --linear-backend torch for BLAS)",
                    "own AVX2 GEMM (cpu), LM head oneDNN" if linear == "cpu" else "oneDNN",
                    n, time.perf_counter() - start, linear_why)
    else:
        logger.info("linear layers: torch (%s)", linear_why)
    return model
