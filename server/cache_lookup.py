"""The pipeline's step 6 (server/gateway.py): a deterministic request answered from the
response cache, or from an identical request already running (in-flight dedup).

Guarantees: only deterministic requests (`is_deterministic`) are looked up; the key is the
request as the client sent it less ``user`` and ``priority``, plus the model's name and, for
an adapter, its path (a name reloaded from another folder is another model); a miss with dedup
on makes this request the group's leader, whose settle step hands its answer to the followers.
"""
from __future__ import annotations

from server.idempotency import fingerprint
from server.pipeline_run import PipelineRun
from server.prod_metrics import ProductionMetrics
from server.recorded import RecordedResponse
from server.response_cache import InFlight, ResponseCache, is_deterministic


async def cached_answer(run: PipelineRun, cache: ResponseCache | None, inflight: InFlight | None,
                        metrics: ProductionMetrics) -> RecordedResponse | None:
    """A cached or deduplicated answer, else None (and then ``run`` may lead its dedup group).
    A hit sets ``run.answer``, ``run.source`` and the hit's response headers."""
    if not is_deterministic(run.req.sampling) or (cache is None and inflight is None):
        return None
    adapter = run.model.lora.lora_path if run.model.lora is not None else None
    run.cache_fp = fingerprint({**{k: v for k, v in run.canonical.items() if k not in ("user", "priority")},
                                "model": run.model.name, **({"lora_path": adapter} if adapter else {})})
    hit, source = None, ""
    if cache is not None:
        hit, source = await cache.get(run.tenant.name, run.cache_fp), "response"
    if hit is None and inflight is not None:
        group = f"{run.tenant.name}:{run.cache_fp}"
        leader = inflight.follow(group)
        hit, source = (await leader if leader is not None else None), "dedup"
        if hit is None:
            inflight.lead(group)
            run.leading = True
    if hit is None:
        metrics.cache_misses.inc()
        return None
    metrics.cache_hits.labels(source).inc()
    run.answer, run.source = hit, source
    run.headers.update({"X-Conveyor-Cache" if source == "response" else "X-Conveyor-Dedup": "hit",
                        "X-Conveyor-Cost": "0"})
    return hit
