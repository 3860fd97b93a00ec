"""Scheduling policies: the order in which waiting requests are admitted, and which running
request is preempted first when KV blocks run out.

A policy is a small class. The scheduler asks it for two sort keys and tells it what it did;
it never needs to know how the scheduler works. Smaller ``admission_key`` is admitted first;
larger ``preemption_key`` is preempted first. A policy whose keys never change while a
request waits sets ``static_keys = True`` so the scheduler can keep waiting requests in a heap
instead of re-sorting them every step.

Policies are chosen by name (``LLM(scheduling_policy="priority")``). A name is one of the
built-ins below, or ``"package.module:ClassName"`` for a policy defined anywhere importable;
a policy class can also be passed directly.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.scheduler.request import Request


class SchedulingPolicy:
    """Base class and the FCFS policy: first come, first served; the newest is preempted first."""

    name = "fcfs"
    static_keys = True

    def admission_key(self, request: "Request", now: float) -> tuple:
        return (request.arrival_time, request.seq_no)

    def preemption_key(self, request: "Request", now: float) -> tuple:
        return self.admission_key(request, now)

    def on_added(self, request: "Request") -> None:
        """Called once when a request enters the engine."""

    def on_scheduled(self, request: "Request", num_tokens: int) -> None:
        """Called for every request that gets tokens in a step (for policies that keep accounts)."""

    def on_finished(self, request: "Request") -> None:
        """Called once when a request leaves the engine."""


class FCFSPolicy(SchedulingPolicy):
    name = "fcfs"


class PriorityPolicy(SchedulingPolicy):
    """Lower ``priority`` runs first, ties by arrival; the lowest priority is preempted first."""

    name = "priority"

    def admission_key(self, request: "Request", now: float) -> tuple:
        return (request.priority, request.arrival_time, request.seq_no)


def builtin_policies() -> dict[str, type[SchedulingPolicy]]:
    from engine.scheduler.policies import FairPolicy, SJFPolicy

    return {"fcfs": FCFSPolicy, "priority": PriorityPolicy, "sjf": SJFPolicy, "fair": FairPolicy}


def make_policy(spec: "str | type[SchedulingPolicy] | SchedulingPolicy") -> SchedulingPolicy:
    """Resolves a policy name, an import path ``"module:Class"``, a class or an instance."""
    if isinstance(spec, SchedulingPolicy):
        return spec
    if isinstance(spec, type) and issubclass(spec, SchedulingPolicy):
        return spec()
    if not isinstance(spec, str):
        raise ValueError(f"scheduling_policy must be a name or a SchedulingPolicy, got {type(spec).__name__}")
    builtins = builtin_policies()
    if spec in builtins:
        return builtins[spec]()
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"scheduling_policy {spec!r} could not be imported: {e}") from None
        return make_policy(cls)
    raise ValueError(
        f"scheduling_policy must be one of {sorted(builtins)} or 'module:Class', got {spec!r}"
    )
