"""Progress of an engine's step loop, for liveness: when a step last completed and whether work
is pending, so /health can tell a wedged engine from an idle one.

Guarantees:
- An idle engine (nothing waiting, running or submitted) is never stalled, however long ago
  its last step was.
- The stall clock starts at the later of the last completed step and the moment work arrived
  on an idle engine: the first request after an hour of idleness is not "an hour late".
- Work counts as pending from the moment it is submitted, so an engine thread stuck outside a
  step (say, while accepting a request) is caught as well as one stuck inside `step()`.
- Thread-safe: the engine thread and submitters record, any thread reads; the lock is held for
  a few assignments only, so a reader (the /health route on the event loop) never waits on a step.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressSnapshot:
    """One consistent reading of a `StepProgress`."""

    pending: bool  # requests waiting or running, or submitted and not yet accepted
    last_step_age: float  # seconds since the last completed step (or since the engine started)
    stall_seconds: float  # seconds work has been pending with no step completing; 0 when idle

    def stall_reason(self, limit: float) -> str | None:
        """Why the engine counts as stalled under `limit` seconds (0: never), else None."""
        if limit <= 0 or not self.pending or self.stall_seconds <= limit:
            return None
        return (f"work is pending and no engine step has completed for {self.stall_seconds:.1f} s "
                f"(health_stall_seconds = {limit:g})")


class StepProgress:
    """What the engine thread records: `work_arrived` on every submitted request, `step_completed`
    after every step, `idle_if` when it finds nothing to run."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last_step = clock()
        self._pending = False
        self._progress_at = self._last_step  # last step, or when work arrived on an idle engine

    def work_arrived(self) -> None:
        with self._lock:
            if not self._pending:
                self._pending = True
                self._progress_at = self._clock()

    def step_completed(self) -> None:
        with self._lock:
            self._last_step = self._progress_at = self._clock()

    def idle_if(self, nothing_submitted: Callable[[], bool]) -> None:
        """Marks the engine idle unless `nothing_submitted()` (checked under the lock) says work
        came in: a submit that lands between the engine's check and this call is never lost."""
        with self._lock:
            if self._pending and nothing_submitted():
                self._pending = False

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            now = self._clock()
            stall = now - self._progress_at if self._pending else 0.0
            return ProgressSnapshot(self._pending, now - self._last_step, max(0.0, stall))
