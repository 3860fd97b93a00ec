"""The model's recommended sampling defaults (its `generation_config`), applied to the fields
a request leaves unset, as vLLM does by default.

Where they come from, by `EngineConfig.generation_config`:
  "auto"           the model's own: `generation_config.json` next to the checkpoint; for a GGUF
                   file, its `general.sampling.*` metadata; for the default model, whose GGUF
                   carries neither, the values its model card recommends (default_model.py).
  "vllm" / "none"  no model defaults: unset fields take neutral values (temperature 1, ...);
                   "vllm" is vLLM's name for this (its own defaults, ignoring the model's file).
  a folder path    the `generation_config.json` in that folder.
Only temperature, top_p, top_k, min_p and repetition_penalty are taken. `max_new_tokens` is
not used as a default max_tokens: the server resolves max_tokens against the context instead.
`do_sample` is ignored, as in vLLM: a file's temperature applies as written.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from engine.models.default_model import DEFAULT_SAMPLING, default_gguf_path
from engine.models.loader import ModelSource
from engine.sampling_params import MODEL_DEFAULTABLE, RequestLimits, SamplingParams

logger = logging.getLogger("conveyor.engine")

MODES = ("auto", "vllm", "none")
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
              "general.sampling.penalty_repeat": "repetition_penalty"}


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults of one model. `values` maps field names of MODEL_DEFAULTABLE to values
    already checked to be in range; `source` says where they came from (for logs)."""

    values: dict[str, float | int] = field(default_factory=dict)
    source: str = "none"

    def prepare(self, params: SamplingParams | None, vocab_size: int, config) -> SamplingParams:
        """The parameters a request runs with: the model's defaults filled into the fields the
        caller left unset, then checked against the model (token ids below `vocab_size`) and
        the engine's bounds on stop strings (`config.max_stop_strings`, `max_stop_chars`).
        Raises InvalidParameterError (a ValueError) naming the field."""
        params = (params or SamplingParams()).with_defaults(self.values)
        params.verify(RequestLimits(vocab_size, getattr(config, "max_stop_strings", 16),
                                    getattr(config, "max_stop_chars", 4096)))
        return params


def load_generation_defaults(source: ModelSource, mode: str = "auto") -> GenerationDefaults:
    """The defaults for the model at `source` under `mode` (see the module docstring). Raises
    ValueError for an unknown mode, a missing folder, or out-of-range values in the file."""
    if mode in ("none", "vllm"):
        return GenerationDefaults()
    if mode not in MODES:
        path = os.path.join(mode, "generation_config.json")
        if not os.path.isfile(path):
            raise ValueError(f"generation_config must be auto, vllm, none or a folder holding "
                             f"generation_config.json, got {mode!r}")
        return _checked(_from_json(path), path)
    if source.is_gguf:
        gguf_path = os.path.join(source.path, source.gguf_file)
        values = _from_gguf(gguf_path)
        if values:
            return _checked(values, f"{gguf_path} (general.sampling metadata)")
        if _is_default_model(gguf_path):
            return _checked(dict(DEFAULT_SAMPLING), "the default model's recommended settings")
    path = os.path.join(source.path, "generation_config.json")
    if os.path.isfile(path):
        return _checked(_from_json(path), path)
    return GenerationDefaults()


def _from_json(path: str) -> dict[str, float | int]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return {k: data[k] for k in MODEL_DEFAULTABLE if data.get(k) is not None}


def _from_gguf(path: str) -> dict[str, float | int]:
    """The `general.sampling.*` values of a GGUF file, read from its key-value header only
    (gguf's GGUFReader also maps every tensor and tokenizer array, ~7 s for the default model
    on a busy 2-core machine; this reads the header in well under a second)."""
    found = {}
    for key, value in _gguf_header(path):
        if key in _GGUF_KEYS and isinstance(value, (int, float)):
            name = _GGUF_KEYS[key]
            found[name] = int(value) if name == "top_k" else float(value)
    return found


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # GGUF value types; 8 is a string, 9 an array


def _gguf_header(path: str):
    """Yields (key, value) for each key-value pair of a GGUF v2/v3 file; arrays are skipped
    (yielded as None). Yields nothing for other files or versions."""
    import struct

    with open(path, "rb") as f:
        def read(fmt: str):
            size = struct.calcsize(fmt)
            return struct.unpack(fmt, f.read(size))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        if f.read(4) != b"GGUF" or read("<I") not in (2, 3):
            return
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key, kind = string(), read("<I")
            if kind in _SCALARS:
                yield key, read(_SCALARS[kind])
            elif kind == 8:
                yield key, string()
            elif kind == 9:
                item, count = read("<I"), read("<Q")
                if item in _SCALARS:
                    f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
                elif item == 8:
                    for _ in range(count):
                        f.seek(read("<Q"), 1)
                else:
                    return  # nested arrays: not used by any key we read
                yield key, None
            else:
                return


def _is_default_model(gguf_path: str) -> bool:
    try:
        return os.path.samefile(gguf_path, default_gguf_path())
    except (RuntimeError, OSError):
        return False


def _checked(values: dict[str, float | int], source: str) -> GenerationDefaults:
    try:
        SamplingParams(**values)  # the same ranges as a request's own values
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    if values:
        logger.info("sampling defaults for unset request fields, from %s: %s", source,
                    ", ".join(f"{k}={v}" for k, v in sorted(values.items())))
    return GenerationDefaults(dict(values), source)
