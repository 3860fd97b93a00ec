"""Built-in policies beyond FCFS and priority: shortest-job-first with aging, and per-tenant
fairness by tokens served."""
from __future__ import annotations

from collections import defaultdict

from engine.scheduler.policy import SchedulingPolicy
from engine.scheduler.request import Request


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


class FairPolicy(SchedulingPolicy):
    """Per-tenant fairness in the spirit of the virtual token counter (VTC).

    Each tenant has a counter of tokens served (prompt tokens computed + tokens generated). The
    waiting request of the least-served tenant is admitted first, and the most-served tenant's
    request is preempted first. A tenant that becomes active is lifted to the smallest counter
    among active tenants, so idling earns no credit to burst with later. A tenant that floods
    requests only raises its own counter and cannot starve a light tenant.
    """

    name = "fair"
    static_keys = False

    def __init__(self) -> None:
        self.served: dict[str, float] = defaultdict(float)
        self.active: dict[str, int] = defaultdict(int)

    @staticmethod
    def _tenant(request: Request) -> str:
        return request.tenant or ""

    def on_added(self, request: Request) -> None:
        tenant = self._tenant(request)
        if self.active[tenant] == 0:
            others = [self.served[t] for t, n in self.active.items() if n > 0 and t != tenant]
            if others:
                self.served[tenant] = max(self.served[tenant], min(others))
        self.active[tenant] += 1

    def on_finished(self, request: Request) -> None:
        self.active[self._tenant(request)] -= 1

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        self.served[self._tenant(request)] += num_tokens

    def admission_key(self, request: Request, now: float) -> tuple:
        return (self.served[self._tenant(request)], request.arrival_time, request.seq_no)

    def preemption_key(self, request: Request, now: float) -> tuple:
        return (self.served[self._tenant(request)], request.arrival_time, request.seq_no)
