"""The interface every scheduling policy implements.

A policy decides the order in which waiting requests are admitted and which running request is
preempted first when KV blocks run out. The scheduler asks it for two sort keys and tells it
what it did; a policy never touches the queues, the KV cache or the batch. Smaller
``admission_key`` is admitted first; larger ``preemption_key`` is preempted first.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Hashable

    from engine.request import Request


class SchedulingPolicy(ABC):
    """Subclasses set ``name`` and implement ``admission_key``.

    ``static_keys = True`` promises that a request's keys never change while it waits, so the
    scheduler keeps waiting requests in a heap; ``False`` means keys depend on ``now`` or on
    accounts kept by the hooks. Such a policy stays fast on a long queue by promising one more
    thing (engine/scheduler/waiting_queue.py): ``keys_only_grow`` (a waiting request's key never
    decreases: a lazy heap re-keys only stale heads), or ``queue_group`` (requests of one group
    keep a static order among themselves: only the groups' heads are re-keyed). With neither,
    the whole queue is re-keyed every step.
    """

    name: str = ""
    static_keys: bool = True
    keys_only_grow: bool = False

    @abstractmethod
    def admission_key(self, request: "Request", now: float) -> tuple:
        """Smaller is admitted first; end the tuple with ``request.seq_no`` so the order is total."""

    def preemption_key(self, request: "Request", now: float) -> tuple:
        """Larger is preempted first. Default: the admission key (the last admitted goes first)."""
        return self.admission_key(request, now)

    def queue_group(self, request: "Request") -> "tuple[Hashable, tuple]":
        """``(group, order_key)``, for a policy with moving keys whose requests of one group
        are always admitted in ``order_key`` order (e.g. one tenant's, by arrival). Override it
        only when that holds; the default is never called."""
        raise NotImplementedError

    def admission_budget(self, budget: int, now: float) -> int:
        """Called once per step: how many of the ``budget`` tokens left after the running
        requests may go to admitting waiting ones (the rest stays unused this step, keeping the
        step short for decodes). Default: all of them."""
        return budget

    def on_added(self, request: "Request") -> None:
        """Called once when a request enters the engine."""

    def on_scheduled(self, request: "Request", num_tokens: int) -> None:
        """Called for every request that gets tokens in a step (for policies that keep accounts)."""

    def on_finished(self, request: "Request") -> None:
        """Called once when a request leaves the engine."""
