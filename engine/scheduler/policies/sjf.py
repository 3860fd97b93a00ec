"""Shortest job first, with aging so long requests cannot starve."""
from __future__ import annotations

from engine.request import Request
from engine.scheduler.policies.base import SchedulingPolicy


class SJFPolicy(SchedulingPolicy):
    """Shortest remaining work first (prompt tokens still to compute + tokens still to generate).

    Aging: every second of waiting counts as ``aging_tokens_per_s`` tokens less work, so a long
    request's key eventually drops below any newcomer's and it cannot starve. Since every waiting
    request ages at the same rate, ``work - aging * (now - arrival)`` orders requests exactly as
    ``work + aging * arrival`` does: the key does not move with time, so it is computed once.
    """

    name = "sjf"
    static_keys = True

    def __init__(self, aging_tokens_per_s: float = 256.0):
        self.aging = aging_tokens_per_s

    def admission_key(self, request: Request, now: float) -> tuple:
        return (request.remaining_tokens + self.aging * request.arrival_time, request.seq_no)

    def preemption_key(self, request: Request, now: float) -> tuple:
        # preempt the request with the most work left (it loses least by waiting)
        return (request.remaining_tokens, request.seq_no)
