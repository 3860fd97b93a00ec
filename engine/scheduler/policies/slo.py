"""Latency targets: of the requests that can still make their TTFT deadline, the shortest
prefill first; optionally, prefill held back while decodes run behind their TPOT target."""
from __future__ import annotations

from engine.request import Request
from engine.scheduler.policies.base import SchedulingPolicy


class SLOPolicy(SchedulingPolicy):
    """A request can make its first-token deadline (arrival + ``ttft_slo_s``) while now <= its
    latest start: the deadline less its prefill at ``prefill_tokens_per_s``. Those that can go
    first, shortest remaining prefill first (most requests under a common deadline; EDF, which
    favours long prompts, met fewer on bursty traces); those that cannot go last, least late
    first. With ``guard_tokens`` set, while the mean step (moving average) exceeds ``tpot_slo_s``
    admissions get at most that many prompt tokens a step; off by default, as on a CPU it cost
    more TTFT than it saved TPOT (docs/scheduling.md). Keys never decrease while waiting."""

    name = "slo"
    static_keys = False
    keys_only_grow = True

    def __init__(self, ttft_slo_s: float = 2.0, tpot_slo_s: float = 0.1,
                 prefill_tokens_per_s: float = 4000.0, guard_tokens: int | None = None):
        self.ttft_slo_s, self.tpot_slo_s, self.guard_tokens = ttft_slo_s, tpot_slo_s, guard_tokens
        self.rate, self.last_step, self.mean_step = prefill_tokens_per_s, None, 0.0

    def admission_key(self, request: Request, now: float) -> tuple:
        prefill = request.num_tokens - request.num_computed_tokens
        latest_start = request.arrival_time + self.ttft_slo_s - prefill / self.rate
        return (0, prefill, request.seq_no) if latest_start >= now else (1, -latest_start, request.seq_no)

    def preemption_key(self, request: Request, now: float) -> tuple:
        return (request.arrival_time, request.seq_no)  # the newest goes first, as in fcfs

    def admission_budget(self, budget: int, now: float) -> int:
        step, self.last_step = (now - self.last_step if self.last_step is not None else 0.0), now
        self.mean_step += 0.2 * (min(step, 4 * self.tpot_slo_s) - self.mean_step)  # an idle gap: 4 targets at most
        guarded = self.guard_tokens is not None and self.mean_step > self.tpot_slo_s
        return min(budget, self.guard_tokens) if guarded else budget
