"""Dequantized tensors of a GGUF file under HF checkpoint names.

Reading and dequantizing is the `gguf` package's job; the GGUF -> HF name mapping comes from
`gguf`'s tensor-name tables, and per-architecture fix-ups (undoing llama.cpp's permutation of the
Llama q/k rows, GPT-2's transposes) from transformers' GGUF tensor processors. This mirrors
`transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint` but builds the name map once
instead of once per submodule, which made that function several times slower than the read.

Parsing the file's metadata (`GGUFReader`: tens of thousands of tokenizer strings, in Python)
and building the name map cost ~4 s of CPU per load of the default model, more than
dequantizing its weights. So where a cache folder is given, the tensor index (each tensor's
name, quantization type, byte offset and array shape, as `GGUFReader` found them) and the name
map are written there once as JSON, and later loads read the tensors' bytes straight from a
memory map of the file, dequantized by `gguf` as before: the same bytes, so the same weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)
INDEX_FILE = "tensor_index.json"


def _name_map(arch: str, hf_names: list[str], num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> HF name, for the HF names the model expects."""
    import gguf

    arch_ids = [k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch]
    if not arch_ids:
        raise ValueError(f"GGUF architecture {arch!r} is unknown to the installed gguf package")
    table = gguf.get_tensor_name_map(arch_ids[0], num_layers)
    mapping = {}
    for hf_name in hf_names:
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            mapping[f"{gguf_name}.{suffix}"] = hf_name
    return mapping


def _hf_names(hf_config) -> list[str]:
    # The HF state-dict keys of this config, from a meta-device model (no memory allocated).
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(hf_config).state_dict())


def _owned(array: np.ndarray) -> np.ndarray:
    # Unquantized tensors come back as read-only views of the memory-mapped file.
    return np.require(array, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def _read_index(path: str, hf_config) -> dict:
    """The file's architecture, name map and tensor index, parsed by `GGUFReader`."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    tensors = [{"name": t.name, "type": int(t.tensor_type), "offset": int(t.data_offset),
                "dtype": t.data.dtype.str, "shape": [int(n) for n in t.data.shape]} for t in reader.tensors]
    return {"arch": arch, "mapping": _name_map(arch, _hf_names(hf_config), hf_config.num_hidden_layers),
            "tensors": tensors}


def _config_key(hf_config) -> str:
    # The name map depends on the config (its layer count, the HF names it yields).
    return hashlib.sha256(hf_config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


def _index(path: str, hf_config, cache_dir: str | None) -> dict:
    """`_read_index`, through `cache_dir`/INDEX_FILE when a cache folder is given. The cache is
    keyed by the config; one that cannot be read or written is skipped, never an error."""
    if cache_dir is None:
        return _read_index(path, hf_config)
    file, key = os.path.join(cache_dir, INDEX_FILE), _config_key(hf_config)
    try:
        with open(file) as f:
            cached = json.load(f)
        if cached.get("config_key") == key:
            return cached
    except (OSError, ValueError):
        pass
    index = {**_read_index(path, hf_config), "config_key": key}
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".index-", dir=cache_dir)
        with os.fdopen(fd, "w") as f:
            json.dump(index, f)
        os.replace(tmp, file)  # atomic: a concurrent reader sees all of it or none
    except OSError as exc:
        logger.info("not caching the GGUF tensor index: %s", exc)
    return index


def _tensor_bytes(data: np.ndarray, entry: dict) -> np.ndarray:
    """One tensor's array over the memory-mapped file, as `GGUFReader` presents it."""
    dtype = np.dtype(entry["dtype"])
    size = int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize
    return data[entry["offset"]: entry["offset"] + size].view(dtype).reshape(entry["shape"])


@dataclass(frozen=True)
class GGUFFile:
    """One GGUF file opened for loading: its tensor index (parsed once, or read from the cache),
    the GGUF -> HF name map, transformers' tensor processor and the file's bytes, memory-mapped.
    A load that reads some tensors as raw blocks and the rest dequantized opens the file once."""

    index: dict
    processor: object
    data: np.ndarray

    @property
    def mapping(self) -> dict[str, str]:
        return self.index["mapping"]

    def dequantized(self, dtype: torch.dtype, skip: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (HF name, tensor in `dtype`) for every tensor the HF architecture uses, but
        those whose HF name is in `skip` (never dequantized)."""
        from gguf import GGMLQuantizationType, dequantize

        mapping = self.mapping
        side_outputs: dict = {"tensors": {}}  # processors may emit renamed tensors here (GPT-2's output)
        for entry in self.index["tensors"]:
            if mapping.get(entry["name"]) in skip:
                continue
            weights = dequantize(_tensor_bytes(self.data, entry), GGMLQuantizationType(entry["type"]))
            result = self.processor.process(
                weights=weights, name=entry["name"], tensor_key_mapping=mapping, parsed_parameters=side_outputs
            )
            if result.name in mapping:
                yield mapping[result.name], torch.from_numpy(_owned(result.weights)).to(dtype)
        for name, value in side_outputs["tensors"].items():
            yield name, value.to(dtype)

    def blocks(self, qtype: int) -> Iterator[tuple[str, torch.Tensor, int]]:
        """Yields (HF name, the tensor's quantized bytes as uint8 [rows, bytes per row], its number
        of columns) for every 2-D tensor of GGML type `qtype` the HF architecture uses, with the
        rows in the order `dequantized` gives them. Only for architectures whose fix-ups move whole
        rows (Llama's q/k permutation) or nothing: otherwise it yields nothing."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, TensorProcessor

        if type(self.processor) not in (TensorProcessor, LlamaTensorProcessor):
            return
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        mapping = self.mapping
        for entry in self.index["tensors"]:
            if entry["type"] != qtype or len(entry["shape"]) != 2:
                continue
            # Llama's fix-up reshapes along rows only, so it permutes the rows of blocks as well
            result = self.processor.process(weights=_tensor_bytes(self.data, entry), name=entry["name"],
                                            tensor_key_mapping=mapping, parsed_parameters={"tensors": {}})
            if result.name in mapping:
                raw = torch.from_numpy(_owned(result.weights))
                yield mapping[result.name], raw, raw.shape[1] // block_bytes * block


def open_gguf(path: str, hf_config, cache_dir: str | None = None) -> GGUFFile:
    """The file at `path` opened for `hf_config`'s architecture. With `cache_dir`, the tensor
    index is parsed once and kept there (module docstring)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    index = _index(path, hf_config, cache_dir)
    processor = TENSOR_PROCESSORS.get(index["arch"], TensorProcessor)(config=hf_config.to_dict())
    return GGUFFile(index, processor, np.memmap(path, dtype=np.uint8, mode="r"))


def iter_gguf(path: str, hf_config, dtype: torch.dtype,
              cache_dir: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, tensor in `dtype`) for every GGUF tensor the HF architecture uses
    (`open_gguf(...).dequantized(dtype)`)."""
    return open_gguf(path, hf_config, cache_dir).dequantized(dtype)
