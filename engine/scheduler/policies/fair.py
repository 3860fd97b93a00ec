"""Per-tenant fairness by tokens served."""
from __future__ import annotations

from collections import defaultdict

from engine.request import Request
from engine.scheduler.policies.base import SchedulingPolicy


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

    def queue_group(self, request: Request) -> tuple:
        # one tenant's requests share its counter, so among themselves they go by arrival
        return self._tenant(request), (request.arrival_time, request.seq_no)

    def preemption_key(self, request: Request, now: float) -> tuple:
        return (self.served[self._tenant(request)], request.arrival_time, request.seq_no)
