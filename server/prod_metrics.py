"""Prometheus counters of the production layer: cache and dedup hits, idempotent replays, guard
actions, routing decisions and shared-store failures in the server's registry; rate-limit refusals and per-tenant requests, tokens and cost
(the series that name tenants) in `tenant_registry`, which only the admin metrics route shows."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class ProductionMetrics:
    def __init__(self, registry: CollectorRegistry, tenant_registry: CollectorRegistry) -> None:
        r, t = registry, tenant_registry
        self.cache_hits = Counter("conveyor_cache_hits", "Requests answered without the engine.",
                                  ["kind"], registry=r)  # response | dedup
        self.cache_misses = Counter("conveyor_cache_misses", "Cacheable requests run on the engine.",
                                    registry=r)
        self.idempotent_replays = Counter("conveyor_idempotent_replays",
                                          "Responses replayed for a repeated Idempotency-Key.", registry=r)
        self.rate_limited = Counter("conveyor_rate_limited", "Requests refused by a tenant's limit.",
                                    ["tenant", "limit"], registry=t)
        self.guard_actions = Counter("conveyor_guard_actions", "Guardrail actions.",
                                     ["guard", "action"], registry=r)
        self.routed = Counter("conveyor_routed_requests", "Requests by the model that served them.",
                              ["model", "reason"], registry=r)
        self.tenant_requests = Counter("conveyor_tenant_requests", "Finished requests per tenant.",
                                       ["tenant", "model"], registry=t)
        self.tenant_tokens = Counter("conveyor_tenant_tokens", "Tokens per tenant.",
                                     ["tenant", "model", "kind"], registry=t)  # prompt|cached|completion
        self.tenant_cost = Counter("conveyor_tenant_cost_dollars", "Cost in US dollars per tenant.",
                                   ["tenant", "model"], registry=t)
        self.store_errors = Counter("conveyor_store_errors", "Shared-store operations that failed "
                                    "(store unreachable).", ["op"], registry=r)
        self.usage_lost = Counter("conveyor_usage_lost", "Settlement writes given up after the store "
                                  "stayed unreachable.", ["kind"], registry=r)  # record|tokens|idempotency

    def guard_action(self, guard: str, action: str, count: int) -> None:
        self.guard_actions.labels(guard, action).inc(count)
