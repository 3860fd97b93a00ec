"""First come, first served."""
from __future__ import annotations

from engine.request import Request
from engine.scheduler.policies.base import SchedulingPolicy


class FCFSPolicy(SchedulingPolicy):
    """Admits by arrival time; the newest arrival is preempted first."""

    name = "fcfs"
    static_keys = True

    def admission_key(self, request: Request, now: float) -> tuple:
        return (request.arrival_time, request.seq_no)
