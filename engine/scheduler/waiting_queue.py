"""The scheduler's queue of waiting requests, ordered by the policy's ``admission_key``.

How it keeps the order depends on what the policy promises (engine/scheduler/policies/base.py),
so a policy whose keys move does not cost a re-sort of the whole queue every step:

* ``static_keys``: one heap; a key is computed once, when the request is queued.
* ``queue_group`` overridden: one heap per group ordered by the group's own static order key;
  only the groups' heads are re-keyed when the best request is asked for (``fair``: one group
  per tenant, so a step costs O(tenants), not O(waiting)).
* ``keys_only_grow``: one lazy heap; a head whose stored key is stale is re-keyed and pushed
  back until the head's key is current, which is exact because no key ever decreases.
* otherwise: the whole queue is re-keyed by ``rerank`` (once per step).

Guarantee, in every mode: ``peek`` returns the request with the smallest current admission key
(ties broken by ``seq_no``), exactly as a full re-sort would.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from engine.scheduler.policies.base import SchedulingPolicy

if TYPE_CHECKING:
    from engine.request import Request


class WaitingQueue:
    def __init__(self, policy: SchedulingPolicy) -> None:
        self.policy = policy
        self.grouped = type(policy).queue_group is not SchedulingPolicy.queue_group
        self.lazy = not policy.static_keys and not self.grouped and policy.keys_only_grow
        self._heap: list[tuple[Any, int, "Request"]] = []  # (key, seq_no, request); unused when grouped
        self._groups: dict[Any, list[tuple[Any, int, "Request"]]] = {}  # group -> heap of (order key, ...)
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator["Request"]:
        heaps = self._groups.values() if self.grouped else [self._heap]
        return (r for heap in heaps for _, _, r in heap)

    def push(self, request: "Request", now: float) -> None:
        self._len += 1
        if self.grouped:
            group, order = self.policy.queue_group(request)
            heapq.heappush(self._groups.setdefault(group, []), (order, request.seq_no, request))
        else:
            heapq.heappush(self._heap, (self.policy.admission_key(request, now), request.seq_no, request))

    def remove(self, request: "Request") -> None:
        """Removes a request from anywhere in the queue (O(n) of its heap: aborts are rare)."""
        for group, heap in (self._groups.items() if self.grouped else [(None, self._heap)]):
            kept = [e for e in heap if e[2] is not request]
            if len(kept) < len(heap):
                heapq.heapify(kept)
                self._len -= 1
                if self.grouped:
                    self._groups[group] = kept
                    if not kept:
                        del self._groups[group]
                else:
                    self._heap = kept
                return

    def rerank(self, now: float) -> None:
        """Call once per step before ``peek``: re-keys the whole queue in the mode that needs it."""
        if not self.policy.static_keys and not self.grouped and not self.lazy:
            self._heap = [(self.policy.admission_key(r, now), r.seq_no, r) for _, _, r in self._heap]
            heapq.heapify(self._heap)

    def peek(self, now: float) -> "Request":
        """The waiting request with the smallest current admission key (the queue must not be empty)."""
        if self.grouped:
            key = self.policy.admission_key
            return min((h[0][2] for h in self._groups.values()), key=lambda r: (key(r, now), r.seq_no))
        if self.lazy:
            while True:
                stored, seq, r = self._heap[0]
                fresh = self.policy.admission_key(r, now)
                if fresh == stored:
                    break
                heapq.heapreplace(self._heap, (fresh, seq, r))
        return self._heap[0][2]

    def pop(self, request: "Request") -> None:
        """Removes ``request``, normally the one ``peek`` just returned (O(log n) then)."""
        if self.grouped:
            group = self.policy.queue_group(request)[0]
            heap = self._groups[group]
            if heap[0][2] is request:
                heapq.heappop(heap)
                self._len -= 1
                if not heap:
                    del self._groups[group]
                return
        elif self._heap[0][2] is request:
            heapq.heappop(self._heap)
            self._len -= 1
            return
        self.remove(request)

    def smallest(self, n: int, now: float, where: Callable[["Request"], bool] = lambda r: True) -> list["Request"]:
        """The ``n`` best waiting requests satisfying ``where``, best first (O(n log n); for
        static batching, which picks a whole batch at once)."""
        key = self.policy.admission_key
        return [r for _, _, r in heapq.nsmallest(n, ((key(r, now), r.seq_no, r) for r in self if where(r)))]
