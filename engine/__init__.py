"""Conveyor's inference engine. Public entry points:

    from engine import LLM, SamplingParams      # offline batch generation
    from engine import LLMEngine, EngineConfig  # step-level control
    from engine import AsyncEngine              # asyncio front (used by the server)
"""
from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "LLMEngine", "EngineConfig", "AsyncEngine", "RequestOutput"]


def __getattr__(name: str):
    # Imported lazily so `import engine.kernels...` does not pull in the whole stack.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "EngineConfig":
        from engine.config import EngineConfig

        return EngineConfig
    if name == "AsyncEngine":
        from engine.async_engine import AsyncEngine

        return AsyncEngine
    if name == "RequestOutput":
        from engine.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(name)
