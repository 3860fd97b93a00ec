"""Triton kernel modules, imported on first use: None where Triton is missing or broken, so the
torch paths (which every caller keeps) still work on any machine."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.lru_cache(maxsize=None)
def triton_module(name: str) -> ModuleType | None:
    """``engine.kernels.<name>`` imported once, or None when the import fails."""
    try:
        return importlib.import_module(f"engine.kernels.{name}")
    except Exception:  # Triton missing or broken: the torch path still works
        return None
