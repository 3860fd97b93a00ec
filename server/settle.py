"""`Settle`: the pipeline's last step (server/gateway.py, step 9), run however a request ends.

Guarantees: it never raises (each part that fails is logged and skipped) and, once begun, it
finishes even if the request's task is cancelled. In order: the rate-limit reservation is
replaced by the real usage (0 tokens for a replay or a cache / dedup hit), a dedup group this
request led gets its answer (or None), the usage record is written and counted in the tenant
metrics (cost 0 unless the engine ran), a completed engine answer goes in the response cache,
and the idempotency key is completed with the answer or, without one, abandoned.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from server.formatting import usage as output_usage
from server.idempotency import Idempotency, fingerprint
from server.pipeline_run import PipelineRun
from server.prod_metrics import ProductionMetrics
from server.rate_limit import RateLimiter
from server.response_cache import InFlight, ResponseCache
from server.served_models import ModelHandle
from server.usage import UsageLog, UsageRecord, cost


@dataclass
class Settle:
    limiter: RateLimiter
    inflight: InFlight | None
    cache: ResponseCache | None
    idempotency: Idempotency
    usage: UsageLog
    metrics: ProductionMetrics
    _settling: set[asyncio.Task] = field(default_factory=set)  # settlements under way

    async def __call__(self, run: PipelineRun) -> None:
        task = asyncio.ensure_future(self._settle_now(run))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)  # a cancelled request leaves it running, not half done

    async def _settle_now(self, run: PipelineRun) -> None:
        """Settles, then ends a stream's trace (here: a cancelled stream's task stops waiting)."""
        try:
            with run.trace.phase("settle"):
                await self._settle_parts(run)
        finally:
            if run.streaming:
                run.trace.end()

    async def _settle_parts(self, run: PipelineRun) -> None:
        from_engine = run.source == "engine"
        u = (output_usage(run.last) if run.last is not None else None) if from_engine else \
            (run.answer.usage if run.answer is not None else None)
        tenant = run.tenant.name
        if run.reservation is not None:
            await _quietly(run, "tokens", run.reservation.settle(u["total_tokens"] if from_engine and u else 0))
        if run.leading:
            self.inflight.finish(f"{tenant}:{run.cache_fp}", run.answer)
        if u is not None and run.model is not None:
            m = run.model
            rec = UsageRecord(time.time(), run.request.scope["state"]["request_id"], tenant,
                              run.req.user or run.request.headers.get("x-user-id"), _feature(run), m.name,
                              m.priced.version, u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"],
                              u["completion_tokens"], model_cost(m, u) if from_engine else 0.0, run.source,
                              m.base.name)
            await _quietly(run, "usage", self.account(rec))
        if from_engine and run.answer is not None and self.cache is not None and run.cache_fp is not None:
            await _quietly(run, "cache", self.cache.put(tenant, run.cache_fp, run.answer))
        if run.owns_key:
            fp = fingerprint(run.canonical)
            await _quietly(run, "idempotency", self.idempotency.abandon(tenant, run.key) if run.answer is None
                           else self.idempotency.complete(tenant, run.key, fp, run.answer))

    async def account(self, rec: UsageRecord) -> None:
        """Counts a usage record in the tenant metrics and writes it to the usage log."""
        m = self.metrics
        m.tenant_requests.labels(rec.tenant, rec.model).inc()
        m.tenant_tokens.labels(rec.tenant, rec.model, "prompt").inc(rec.prompt_tokens)
        m.tenant_tokens.labels(rec.tenant, rec.model, "cached").inc(rec.cached_tokens)
        m.tenant_tokens.labels(rec.tenant, rec.model, "completion").inc(rec.completion_tokens)
        m.tenant_cost.labels(rec.tenant, rec.model).inc(rec.cost)
        await self.usage.record(rec)


def model_cost(model: ModelHandle, u: dict[str, Any]) -> float:
    """What a request with usage ``u`` (OpenAI's usage object) costs on ``model``, in US dollars."""
    return cost(model.priced.price, u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"],
                u["completion_tokens"])


async def _quietly(run: PipelineRun, what: str, step: Any) -> None:
    try:
        await step
    except Exception:  # noqa: BLE001 - settling must never break the response
        run.log.exception("settling %s failed", what)


def _feature(run: PipelineRun) -> str | None:
    metadata = run.body.get("metadata") if isinstance(run.body.get("metadata"), dict) else {}
    return run.request.headers.get("x-feature-id") or metadata.get("feature")
