"""LoRA settings from the command line and the config file, turned into what the engine and
the server need: `parse_module` reads one `--lora-modules` item (vLLM's `name=path` or its JSON
form), `merge` lays the flags over the config's `[lora]` table, `engine_overrides` gives the
`EngineConfig` fields. Every error is a `ValueError` naming the flag or field."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from server.config_file import LoRAConfig, LoRAModuleConfig

ENGINE_FIELDS = ("max_loras", "max_lora_rank", "max_cpu_loras")


def parse_module(spec: str) -> LoRAModuleConfig:
    """`name=path`, or `{"name": ..., "path": ..., "base_model_name": ...}` (vLLM's forms)."""
    text = spec.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--lora-modules: not valid JSON: {spec!r} ({exc.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("path"), str):
            raise ValueError(f"--lora-modules: the JSON form needs string fields name and path, got {spec!r}")
        unknown = sorted(set(data) - {"name", "path", "base_model_name"})
        if unknown:
            raise ValueError(f"--lora-modules: unknown field(s) {unknown} in {spec!r}")
        base = data.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise ValueError(f"--lora-modules: base_model_name must be a string, got {base!r}")
        name, path = data["name"], data["path"]
    else:
        name, sep, path = text.partition("=")
        base = None
        if not sep:
            raise ValueError(f"--lora-modules: expected name=path or a JSON object, got {spec!r}")
    if not name.strip() or not path.strip():
        raise ValueError(f"--lora-modules: the adapter name and path must not be empty, got {spec!r}")
    return LoRAModuleConfig(name.strip(), path.strip(), base)


def merge(config: LoRAConfig | None, *, enable_lora: bool = False, modules: list[str] | None = None,
          **limits: int | None) -> LoRAConfig | None:
    """The config file's `[lora]` with the command line's flags on top: set limits replace the
    file's, modules are added after the file's. None when LoRA is off either way."""
    base = config or LoRAConfig()
    extra = [parse_module(m) for m in modules or []]
    set_limits = {k: v for k, v in limits.items() if v is not None}
    merged = dataclasses.replace(base, enable_lora=base.enable_lora or enable_lora,
                                 lora_modules=[*base.lora_modules, *extra], **set_limits)
    if not merged.enabled:
        if set_limits:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in set_limits)} need "
                             "--enable-lora or --lora-modules")
        if any(getattr(base, k) is not None for k in ENGINE_FIELDS):
            raise ValueError("lora: max_loras, max_lora_rank and max_cpu_loras need enable_lora = true or lora_modules")
        return None
    return merged


def engine_overrides(config: LoRAConfig | None) -> dict[str, Any]:
    """The EngineConfig fields of a model's LoRA settings ({} when LoRA is off)."""
    if config is None or not config.enabled:
        return {}
    return {"enable_lora": True, **{k: getattr(config, k) for k in ENGINE_FIELDS if getattr(config, k) is not None}}
