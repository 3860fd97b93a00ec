"""Scheduling policies: the interface (`base.SchedulingPolicy`), one module per built-in policy,
and `make_policy`, which resolves what a user names.

Policies are chosen by name (``LLM(scheduling_policy="priority")``). A name is one of
`BUILTIN_POLICIES`, or ``"package.module:ClassName"`` for a policy defined anywhere importable;
a policy class or instance can also be passed directly.
"""
from __future__ import annotations

import importlib

from engine.scheduler.policies.base import SchedulingPolicy
from engine.scheduler.policies.fair import FairPolicy
from engine.scheduler.policies.fcfs import FCFSPolicy
from engine.scheduler.policies.priority import PriorityPolicy
from engine.scheduler.policies.sjf import SJFPolicy
from engine.scheduler.policies.slo import SLOPolicy

__all__ = ["BUILTIN_POLICIES", "FCFSPolicy", "FairPolicy", "PriorityPolicy", "SJFPolicy", "SLOPolicy",
           "SchedulingPolicy", "make_policy"]

BUILTIN_POLICIES: dict[str, type[SchedulingPolicy]] = {
    cls.name: cls for cls in (FCFSPolicy, PriorityPolicy, SJFPolicy, FairPolicy, SLOPolicy)
}


def make_policy(spec: "str | type[SchedulingPolicy] | SchedulingPolicy") -> SchedulingPolicy:
    """Resolves a policy name, an import path ``"module:Class"``, a class or an instance.
    Raises ValueError naming ``scheduling_policy`` for anything else."""
    if isinstance(spec, SchedulingPolicy):
        return spec
    if isinstance(spec, type) and issubclass(spec, SchedulingPolicy):
        try:
            return spec()
        except TypeError as e:  # e.g. an abstract class, or one whose __init__ needs arguments
            raise ValueError(f"scheduling_policy {spec.__name__} could not be built: {e}") from None
    if not isinstance(spec, str):
        raise ValueError(f"scheduling_policy must be a name or a SchedulingPolicy, got {type(spec).__name__}")
    if spec in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[spec]()
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"scheduling_policy {spec!r} could not be imported: {e}") from None
        return make_policy(cls)
    raise ValueError(
        f"scheduling_policy must be one of {sorted(BUILTIN_POLICIES)} or 'module:Class', got {spec!r}"
    )
