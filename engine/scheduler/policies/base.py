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
    from engine.request import Request


class SchedulingPolicy(ABC):
    """Subclasses set ``name`` and implement ``admission_key``.

    ``static_keys = True`` promises that a request's keys never change while it waits, so the
    scheduler keeps waiting requests in a heap; ``False`` makes it re-key the queue every step
    (needed when keys depend on ``now`` or on accounts kept by the hooks).
    """

    name: str = ""
    static_keys: bool = True

    @abstractmethod
    def admission_key(self, request: "Request", now: float) -> tuple:
        """Smaller is admitted first; end the tuple with ``request.seq_no`` so the order is total."""

    def preemption_key(self, request: "Request", now: float) -> tuple:
        """Larger is preempted first. Default: the admission key (the last admitted goes first)."""
        return self.admission_key(request, now)

    def on_added(self, request: "Request") -> None:
        """Called once when a request enters the engine."""

    def on_scheduled(self, request: "Request", num_tokens: int) -> None:
        """Called for every request that gets tokens in a step (for policies that keep accounts)."""

    def on_finished(self, request: "Request") -> None:
        """Called once when a request leaves the engine."""
