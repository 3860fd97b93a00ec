"""Loading one PEFT LoRA adapter into CPU memory, validated against the model it will run on.

Supported: ``adapter_config.json`` with ``peft_type`` LORA, rank ``r``, ``lora_alpha``,
``use_rslora`` (scaling alpha / sqrt(r) instead of alpha / r), ``target_modules`` among the
model's projections (`engine/lora/targets.py`); weights in ``adapter_model.safetensors`` (or
``adapter_model.bin``). ``lora_dropout`` is a training setting and is ignored. Anything that
changes the math in a way we do not implement (``modules_to_save``, DoRA, LoRA biases, per-module
rank or alpha patterns, embedding adapters) is refused with a `LoRAError` naming the key, so an
adapter either runs exactly as PEFT would or does not load.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from engine.lora.errors import LoRAError
from engine.lora.request import LoRARequest
from engine.lora.targets import ModelTargets

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# adapter_config.json keys whose non-empty / true values we cannot honour
_UNSUPPORTED = ("modules_to_save", "use_dora", "rank_pattern", "alpha_pattern", "lora_bias",
                "target_parameters", "layer_replication", "trainable_token_indices")
# HF config keys that must agree between the adapter's base model and ours when both are known
_COMPARED = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "vocab_size")


@dataclass(frozen=True)
class LoRAAdapter:
    """A loaded adapter: ``weights[(layer, site name)] = (A [rank, in], B [out, rank])`` on the
    CPU, and the scale its delta is multiplied by. ``uid`` is the engine's own id for this
    load (unique for the engine's life: unload + load again gives a new one), used for slots
    and as the prefix-cache salt."""

    request: LoRARequest
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    uid: int = 0

    @property
    def name(self) -> str:
        return self.request.lora_name


def load_adapter(request: LoRARequest, targets: ModelTargets, max_rank: int,
                 base_config: dict | None = None) -> LoRAAdapter:
    """Reads and validates the adapter at ``request.lora_path``; raises `LoRAError` naming the
    field at fault (never another exception for a bad adapter folder)."""
    check_request(request)
    config = _read_config(request.lora_path)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoRAError("peft_type", f"peft_type: only LORA adapters are supported, got {config['peft_type']!r}")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise LoRAError(key, f"{key}: adapters using {key} are not supported (got {config[key]!r})")
    if config.get("bias", "none") != "none":
        raise LoRAError("bias", f"bias: adapters that train biases are not supported (got {config['bias']!r})")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoRAError("rank", f"rank: adapter_config.json must give r as a positive integer, got {rank!r}")
    if rank > max_rank:
        raise LoRAError("rank", f"rank: adapter {request.lora_name!r} has rank {rank}, above max_lora_rank={max_rank}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise LoRAError("lora_alpha", f"lora_alpha must be a number, got {alpha!r}")
    if not _finite(alpha):  # NaN / Infinity (Python's json accepts them) or an int past float range
        raise LoRAError("lora_alpha", f"lora_alpha must be a finite number, got {str(alpha)[:40]}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    _check_target_modules(config.get("target_modules"), targets)
    _check_base_model(config.get("base_model_name_or_path"), base_config)
    weights = _read_weights(request.lora_path, targets, rank)
    return LoRAAdapter(request, rank, float(scaling), weights)


def check_request(request: LoRARequest) -> None:
    if not isinstance(request, LoRARequest):
        raise LoRAError("lora_request", f"lora_request must be a LoRARequest, got {type(request).__name__}")
    if not isinstance(request.lora_name, str) or not request.lora_name.strip():
        raise LoRAError("lora_name", "lora_name must be a non-empty string")
    if not isinstance(request.lora_path, str) or not request.lora_path:
        raise LoRAError("lora_path", "lora_path must be a non-empty string")


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer too large for a float
        return False


def _read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise LoRAError("lora_path", f"lora_path: {path!r} is not a directory")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise LoRAError("lora_path", f"lora_path: {path!r} holds no {CONFIG_FILE}")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise LoRAError("lora_path", f"lora_path: {CONFIG_FILE} cannot be read ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})") from None
    if not isinstance(config, dict):
        raise LoRAError("lora_path", f"lora_path: {CONFIG_FILE} must hold a JSON object")
    return config


def _check_target_modules(names, targets: ModelTargets) -> None:
    """A list must name projections the model has; a string (a regex, or ``all-linear``) is
    checked through the weights instead."""
    if names is None or isinstance(names, str):
        return
    if not isinstance(names, (list, tuple)):
        raise LoRAError("target_modules", f"target_modules must be a list or a string, got {names!r}")
    known = targets.short_names() | {s.name for s in targets.sites}
    # PEFT matches an entry against a module's whole name or its dotted suffix
    missing = sorted(str(n) for n in names if not any(n == k or str(n).endswith("." + k) for k in known))
    if missing:
        raise LoRAError("target_modules", f"target_modules: the model has no {', '.join(missing)} "
                                          f"(LoRA can target {', '.join(sorted(targets.short_names()))})")


def _check_base_model(base: str | None, ours: dict | None) -> None:
    """Compares the adapter's base model with ours when it is comparable: a local folder with a
    config.json. A hub id alone is not compared (the same model is often stored under another
    name); mismatched weight shapes are caught in `_read_weights` either way."""
    if not base or ours is None or not isinstance(base, str):
        return
    file = os.path.join(base, "config.json")
    if not os.path.isfile(file):
        return
    try:
        with open(file, encoding="utf-8") as f:
            theirs = json.load(f)
    except (OSError, ValueError, RecursionError):
        return
    if not isinstance(theirs, dict):  # not a model config: nothing to compare
        return
    diff = [k for k in _COMPARED if k in theirs and k in ours and theirs[k] != ours[k]]
    if diff:
        k = diff[0]
        raise LoRAError("base_model_name_or_path",
                        f"base_model_name_or_path: the adapter was trained on {base!r}, whose {k} is "
                        f"{theirs[k]!r}; this model's is {ours[k]!r}")


def _read_weights(path: str, targets: ModelTargets, rank: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    tensors = _read_tensors(path)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = targets.parse_key(key)
        site = targets.site(parsed[1]) if parsed else None
        if site is None:
            raise LoRAError("target_modules", f"target_modules: weight {key!r} targets a module the model "
                                              f"lacks or LoRA cannot adapt here")
        layer, _, half = parsed
        if layer >= targets.num_layers:
            raise LoRAError("base_model_name_or_path", f"base_model_name_or_path: weight {key!r} is for layer "
                                                       f"{layer}, but the model has {targets.num_layers} layers")
        expected = (rank, site.in_features) if half == "A" else (site.out_features, rank)
        if tuple(tensor.shape) != expected:
            raise LoRAError("base_model_name_or_path",
                            f"base_model_name_or_path: weight {key!r} has shape {tuple(tensor.shape)}, expected "
                            f"{expected} for this model (an adapter for another base model?)")
        halves.setdefault((layer, site.name), {})[half] = tensor.detach().to("cpu").contiguous()
    if not halves:
        raise LoRAError("lora_path", f"lora_path: {path!r} holds no LoRA weights")
    weights = {}
    for (layer, name), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise LoRAError("lora_path", f"lora_path: layer {layer} {name} has lora_{next(iter(pair))} "
                                         f"but not its other half")
        weights[(layer, name)] = (pair["A"], pair["B"])
    return weights


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    for file_name in WEIGHT_FILES:
        file = os.path.join(path, file_name)
        if not os.path.isfile(file):
            continue
        try:
            if file_name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(file, device="cpu")
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the client's bad path
            raise LoRAError("lora_path", f"lora_path: {file_name} cannot be read ({type(exc).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LoRAError("lora_path", f"lora_path: {file_name} does not hold a dict of tensors")
        return state
    raise LoRAError("lora_path", f"lora_path: {path!r} holds none of {', '.join(WEIGHT_FILES)}")
