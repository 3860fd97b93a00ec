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

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from engine.request import RequestStatus

if TYPE_CHECKING:
    from engine.output_processor import OutputProcessor
    from engine.outputs import RequestOutput
    from engine.scheduler.output import SchedulerOutput
    from engine.scheduler.scheduler import Scheduler

logger = logging.getLogger("conveyor.engine")

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


class StepFailures:
    """Ends a failed step's requests and counts failed steps in a row."""

    def __init__(self, scheduler: Scheduler, outputs: OutputProcessor, check_integrity: Callable[[], None]):
        self.scheduler = scheduler
        self.outputs = outputs
        self.check_integrity = check_integrity
        self.consecutive = 0

    def succeeded(self) -> None:
        self.consecutive = 0

    def fail(self, sched: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """Ends every request of the failed step (and its ``n > 1`` siblings) with an error
        output; raises `EngineFatalError` when the engine must not go on."""
        if is_fatal(exc):
            raise EngineFatalError(f"engine step failed with an unrecoverable error: {exc!r}") from exc
        self.consecutive += 1
        ids = [s.request_id for s in sched.scheduled]
        logger.error("engine step failed; failing its %d requests %s", len(ids), ids[:8], exc_info=exc)
        self.scheduler.fail_step(sched)
        now = time.time()
        message = f"the engine failed while running this request ({type(exc).__name__})"
        failed = []
        for group in self.outputs.groups_of(ids):
            for seq in group.seqs:  # siblings of an n > 1 request fail with it
                self.scheduler.finish_request(seq.request, RequestStatus.FINISHED_ERROR)
            failed.append(self.outputs.fail(group, message, now))
        self.check_integrity()
        if self.consecutive >= MAX_CONSECUTIVE_FAILED_STEPS:
            raise EngineFatalError(f"{self.consecutive} engine steps in a row failed; last: {exc!r}") from exc
        return failed
