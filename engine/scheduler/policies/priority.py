"""Strict priority classes, FCFS within a class."""
from __future__ import annotations

from engine.request import Request
from engine.scheduler.policies.base import SchedulingPolicy


class PriorityPolicy(SchedulingPolicy):
    """Lower ``priority`` runs first, ties by arrival; the lowest priority (largest value), then
    the newest, is preempted first."""

    name = "priority"
    static_keys = True

    def admission_key(self, request: Request, now: float) -> tuple:
        return (request.priority, request.arrival_time, request.seq_no)
