"""Worked example from docs/scheduling.md: a new scheduling policy in under 30 lines."""
from engine.scheduler.policies import SchedulingPolicy


class EarliestDeadlinePolicy(SchedulingPolicy):
    """Earliest deadline first: admits the request whose first-token deadline comes first and
    preempts the running request whose deadline is latest.

    A request's deadline is its arrival time plus the TTFT target of its priority class
    (``targets_s``; other classes get ``default_s``). The deadline never changes while the
    request waits, so the keys are static and the scheduler keeps the queue in a heap.
    """

    name = "edf"
    static_keys = True

    def __init__(self, targets_s: dict[int, float] | None = None, default_s: float = 10.0):
        self.targets_s = {0: 1.0, 1: 30.0} if targets_s is None else targets_s
        self.default_s = default_s

    def deadline(self, request) -> float:
        return request.arrival_time + self.targets_s.get(request.priority, self.default_s)

    def admission_key(self, request, now: float) -> tuple:
        return (self.deadline(request), request.seq_no)

    def preemption_key(self, request, now: float) -> tuple:
        return (self.deadline(request), request.seq_no)  # the largest key is preempted first
