"""Latency targets: least slack to the TTFT deadline first, decodes first when TPOT is at risk."""
from __future__ import annotations

from engine.request import Request
from engine.scheduler.policies.base import SchedulingPolicy


class SLOPolicy(SchedulingPolicy):
    """Admits the request with the least slack to its first-token deadline (arrival +
    ``ttft_slo_s``) that can still make it, after estimating its prefill at
    ``prefill_tokens_per_s``; requests that can no longer make it go last, least late first.
    When a step took longer than ``tpot_slo_s`` (running decodes are missing their target),
    admissions get at most ``guard_tokens`` prompt tokens that step. Keys only ever grow (a
    request flips once from "can make it" to "late"), so the queue is a lazy heap."""

    name = "slo"
    static_keys = False
    keys_only_grow = True

    def __init__(self, ttft_slo_s: float = 2.0, tpot_slo_s: float = 0.1,
                 prefill_tokens_per_s: float = 4000.0, guard_tokens: int = 64):
        self.ttft_slo_s, self.tpot_slo_s = ttft_slo_s, tpot_slo_s
        self.rate, self.guard_tokens, self.last_step = prefill_tokens_per_s, guard_tokens, None

    def admission_key(self, request: Request, now: float) -> tuple:
        prefill = request.num_tokens - request.num_computed_tokens
        latest_start = request.arrival_time + self.ttft_slo_s - prefill / self.rate
        return (0, latest_start, request.seq_no) if latest_start >= now else (1, -latest_start, request.seq_no)

    def preemption_key(self, request: Request, now: float) -> tuple:
        return (request.arrival_time, request.seq_no)  # the newest goes first, as in fcfs

    def admission_budget(self, budget: int, now: float) -> int:
        step, self.last_step = (now - self.last_step if self.last_step is not None else 0.0), now
        return min(budget, self.guard_tokens) if step > self.tpot_slo_s else budget
