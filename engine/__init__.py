"""Conveyor's inference engine. Public entry points:

    from engine import LLM, SamplingParams      # offline batch generation
    from engine import LLMEngine, EngineConfig  # step-level control
    from engine import AsyncEngine              # asyncio front (used by the server)
    from engine import LoRARequest              # a LoRA adapter (engine/lora/)
"""
from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "LLMEngine", "EngineConfig", "AsyncEngine", "RequestOutput", "LoRARequest"]


# name -> module; imported lazily so `import engine.kernels...` does not pull in the whole stack
_EXPORTS = {
    "LLM": "engine.llm",
    "SamplingParams": "engine.sampling_params",
    "LLMEngine": "engine.llm_engine",
    "EngineConfig": "engine.config",
    "AsyncEngine": "engine.async_engine",
    "RequestOutput": "engine.outputs",
    "LoRARequest": "engine.lora.request",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
