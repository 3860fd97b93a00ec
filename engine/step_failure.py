"""What happens when an engine step raises.

A failed step fails only its own requests: `LLMEngine.step` finishes each of them with
finish_reason "error" (KV blocks freed, unwritten blocks dropped from the prefix cache) and
keeps serving. The engine gives up, raising `EngineFatalError`, only when it cannot trust the
device or its own state any more: an error the device does not recover from (a CUDA error
poisons the context for good), or ``MAX_CONSECUTIVE_FAILED_STEPS`` failed steps in a row (a
request that breaks a step leaves with that step, so repeated failures mean the engine itself
is broken). `AsyncEngine` then reports itself dead so an orchestrator restarts the process.
"""
from __future__ import annotations

import torch

MAX_CONSECUTIVE_FAILED_STEPS = 3

# Substrings of errors after which a CUDA/ROCm context is unusable.
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert",
                  "illegal memory access", "HIP error", "NCCL error")


class EngineFatalError(RuntimeError):
    """The engine cannot continue; the cause is chained as ``__cause__``."""


def is_fatal(exc: BaseException) -> bool:
    """True for errors no engine state can recover from (device errors, host out of memory)."""
    if isinstance(exc, (EngineFatalError, MemoryError)):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)[:2000]
    return any(marker in text for marker in _FATAL_MARKERS)
