"""The production layer: what happens to a generation request between HTTP and the engine.

In order: authenticate (401) -> parse -> idempotency (replay / 409 / 422) -> input guards ->
choose the model (explicit, default, or `auto` routing; 403 if the tenant may not use it) ->
tokenize and check limits -> rate limits (429) -> response cache / in-flight dedup -> run on
the model's engine with the tenant's prefix-cache salt, priority and output guards. When the
request ends, however it ends, its rate-limit reservation is settled to the real usage, a
usage record is written, and a completed response is stored for idempotent replays and the
cache. Every response names the model (`X-Conveyor-Model`) and carries the tenant's
`x-ratelimit-*` headers; JSON responses carry their cost (`X-Conveyor-Cost`, US dollars).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.outputs import RequestOutput
from server.auth import Authenticator
from server.config_file import ModelConfig, ProductionConfig, TenantConfig
from server.errors import APIError
from server.formatting import usage as output_usage
from server.guardrails import GuardChain, build_guard
from server.idempotency import HEADER as IDEMPOTENCY_HEADER, Idempotency, check_key, fingerprint
from server.prod_metrics import ProductionMetrics
from server.protocol import ChatCompletionRequest, GenerationRequest
from server.rate_limit import RateLimiter
from server.recorded import RecordedResponse
from server.response_cache import InFlight, ResponseCache, is_deterministic
from server.routing import AUTO, Router
from server.request_hooks import RequestHooks
from server.serving import GenerationService, parse_request, read_json
from server.store import Store
from server.usage import UsageLog, UsageRecord, cost, parse_time


@dataclass
class _Model:
    config: ModelConfig
    service: GenerationService


@dataclass
class Gateway:
    config: ProductionConfig
    services: list[tuple[ModelConfig | None, GenerationService]]  # None: the unconfigured model
    store: Store
    metrics: ProductionMetrics
    auth: Authenticator = field(init=False)
    limiter: RateLimiter = field(init=False)
    idempotency: Idempotency = field(init=False)
    usage: UsageLog = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        self.auth = Authenticator(c.tenants)
        self.limiter = RateLimiter(self.store, c.rate_limit_window_seconds,
                                   on_reject=lambda t, which: self.metrics.rate_limited.labels(t, which).inc())
        self.idempotency = Idempotency(self.store, c.idempotency.ttl_seconds, c.idempotency.join_in_flight)
        self.cache = ResponseCache(self.store, c.cache.ttl_seconds) if c.cache.response_cache else None
        self.inflight = InFlight() if c.cache.dedup else None
        self.usage = UsageLog(self.store)
        self.guards = {name: build_guard(name, g) for name, g in c.guards.items()}

    # ---- models -------------------------------------------------------------------------
    def models(self) -> list[_Model]:
        """Served models, small to large; an unconfigured one is named by its service."""
        return [_Model(cfg or ModelConfig(name=svc.served_name()), svc) for cfg, svc in self.services]

    def allowed(self, tenant: TenantConfig) -> list[_Model]:
        return [m for m in self.models() if tenant.models is None or m.config.name in tenant.models]

    def model_for(self, tenant: TenantConfig, name: str | None) -> _Model:
        """The model a request names (None: the tenant's first allowed); 404 / 403 otherwise."""
        models = self.models()
        if name is None:
            allowed = self.allowed(tenant)
            if not allowed:
                raise APIError(403, f"Tenant {tenant.name} may not use any model.", code="model_not_allowed")
            return allowed[0]
        for m in models:
            if name == m.config.name or (m.service.engine.engine is not None
                                         and name == m.service.engine.model_name):
                if tenant.models is not None and m.config.name not in tenant.models:
                    raise APIError(403, f"Tenant {tenant.name} may not use the model `{name}`.",
                                   param="model", code="model_not_allowed")
                return m
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def _route(self, tenant: TenantConfig, req: GenerationRequest) -> tuple[_Model, str]:
        if req.model != AUTO:
            return self.model_for(tenant, req.model), "explicit" if req.model else "default"
        models = self.models()
        probe = models[0].service
        probe.require_ready()
        prompt_tokens = len(probe.prompt_ids(req))
        max_tokens = req.max_tokens or max(1, probe.engine.max_model_len - prompt_tokens)
        router = Router(self.config.routing, [m.config for m in models])
        decision = router.choose(tenant, prompt_tokens, max_tokens, _text_of(req))
        return next(m for m in models if m.config.name == decision.model), decision.reason

    # ---- the request --------------------------------------------------------------------
    def tenant(self, request: Request) -> TenantConfig:
        return self.auth.authenticate(request.headers.get("authorization"))

    async def handle(self, request: Request, chat: bool) -> Response:
        tenant = self.tenant(request)
        body = await read_json(request, self.services[0][1].settings.max_body_bytes)
        req = parse_request(body, chat)
        canonical = {k: v for k, v in dataclasses.asdict(req).items() if k != "timeout"}
        canonical["endpoint"] = "chat" if chat else "completions"
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None:
            key = check_key(key)
            replay = await self.idempotency.begin(tenant.name, key, fingerprint(canonical))
            if replay is not None:
                self.metrics.idempotent_replays.inc()
                rl = await self.limiter.current_headers(tenant)
                return replay.replay({**rl, "Idempotent-Replayed": "true"})
        try:
            return await self._run(request, tenant, req, body, chat, canonical, key)
        except BaseException:
            if key is not None:  # failed before running: the client may retry with the key
                await self.idempotency.abandon(tenant.name, key)
            raise

    async def _run(self, request: Request, tenant: TenantConfig, req: GenerationRequest,
                   body: dict, chat: bool, canonical: dict, key: str | None) -> Response:
        """Everything after idempotency; the key (if any) is completed or abandoned when the
        request ends."""
        chain = GuardChain([self.guards[g] for g in tenant.guards], self.metrics.guard_action) \
            if tenant.guards else None
        if chain is not None:
            if req.logprobs is not None:  # token strings would bypass the output guards
                raise APIError(400, "logprobs are not available to tenants with output guardrails.",
                               param="logprobs", code="unsupported")
            _rewrite_input(req, chain)
        model, reason = self._route(tenant, req)
        service = model.service
        service.require_ready()
        prep = service.prepare(req, chat)
        name = model.config.name
        reservation = await self.limiter.reserve(tenant, len(prep.prompt_ids) + prep.max_tokens * prep.params.n)
        self.metrics.routed.labels(name, reason).inc()
        headers = {**reservation.headers, "X-Conveyor-Model": name, "X-Conveyor-Route": reason}
        user = req.user or request.headers.get("x-user-id")
        metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        feature = request.headers.get("x-feature-id") or metadata.get("feature")
        rid = request.scope["state"]["request_id"]

        def usage_of(u: dict[str, Any], source: str) -> UsageRecord:
            return UsageRecord(time.time(), rid, tenant.name, user, feature, name, model.config.version,
                               u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"],
                               u["completion_tokens"], _cost(model.config, u) if source == "engine" else 0.0,
                               source)

        async def answer(recorded: RecordedResponse, source: str, mark: dict[str, str]) -> Response:
            self.metrics.cache_hits.labels(source).inc()
            await reservation.settle(0)  # no engine tokens spent
            await self._account(usage_of(recorded.usage, source))
            if key is not None:
                await self.idempotency.complete(tenant.name, key, fingerprint(canonical), recorded)
            return recorded.replay({**headers, **mark, "X-Conveyor-Cost": "0"})

        cacheable = is_deterministic(req.sampling) and (self.cache or self.inflight) is not None
        cache_fp = fingerprint({**{k: v for k, v in canonical.items() if k not in ("user", "priority")},
                                "model": name}) if cacheable else ""
        leading = False
        try:
            if cacheable and self.cache is not None:
                hit = await self.cache.get(tenant.name, cache_fp)
                if hit is not None:
                    return await answer(hit, "response", {"X-Conveyor-Cache": "hit"})
            if cacheable and self.inflight is not None:
                leader = self.inflight.follow(f"{tenant.name}:{cache_fp}")
                shared = await leader if leader is not None else None
                if shared is not None:
                    return await answer(shared, "dedup", {"X-Conveyor-Dedup": "hit"})
                self.inflight.lead(f"{tenant.name}:{cache_fp}")
                leading = True
            if cacheable:
                self.metrics.cache_misses.inc()
        except BaseException:
            await reservation.settle(0)
            raise

        async def on_done(last: RequestOutput | None, recorded: RecordedResponse | None) -> None:
            u = output_usage(last) if last is not None else None
            await reservation.settle(u["total_tokens"] if u else 0)
            if leading:
                self.inflight.finish(f"{tenant.name}:{cache_fp}", recorded)
            if u is not None:
                await self._account(usage_of(u, "engine"))
            if recorded is not None:
                if self.cache is not None and cacheable:
                    await self.cache.put(tenant.name, cache_fp, recorded)
                if key is not None:
                    await self.idempotency.complete(tenant.name, key, fingerprint(canonical), recorded)
            elif key is not None:
                await self.idempotency.abandon(tenant.name, key)

        hooks = RequestHooks(
            tenant=tenant.name, cache_salt=f"tenant:{tenant.name}",
            priority=req.priority if "priority" in body else tenant.priority, model_name=name,
            headers=headers, wrap_stream=chain.wrap if chain is not None else None, on_done=on_done,
            final_headers=lambda out: {"X-Conveyor-Cost": f"{_cost(model.config, output_usage(out)):.8f}"})
        try:
            return await service.execute(request, req, chat, prep, hooks)
        except BaseException:
            await reservation.settle(0)  # a no-op if on_done already settled
            if leading:
                self.inflight.finish(f"{tenant.name}:{cache_fp}", None)
            raise

    async def _account(self, rec: UsageRecord) -> None:
        m = self.metrics
        m.tenant_requests.labels(rec.tenant, rec.model).inc()
        m.tenant_tokens.labels(rec.tenant, rec.model, "prompt").inc(rec.prompt_tokens)
        m.tenant_tokens.labels(rec.tenant, rec.model, "cached").inc(rec.cached_tokens)
        m.tenant_tokens.labels(rec.tenant, rec.model, "completion").inc(rec.completion_tokens)
        m.tenant_cost.labels(rec.tenant, rec.model).inc(rec.cost)
        await self.usage.record(rec)

    async def usage_report(self, request: Request) -> Response:
        """`GET /v1/usage?group_by=tenant|user|feature|model&start=&end=` (admin keys only)."""
        self.auth.require_admin(self.tenant(request))
        q = request.query_params
        report = await self.usage.rollup(q.get("group_by", "tenant"), parse_time(q.get("start"), "start"),
                                         parse_time(q.get("end"), "end"))
        return JSONResponse(report)


def _cost(model: ModelConfig, u: dict[str, Any]) -> float:
    return cost(model.price, u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"],
                u["completion_tokens"])


def _text_of(req: GenerationRequest) -> str:
    if isinstance(req, ChatCompletionRequest):
        return "\n".join(m["content"] for m in req.messages)
    return req.prompt if isinstance(req.prompt, str) else ""


def _rewrite_input(req: GenerationRequest, chain: GuardChain) -> None:
    """Runs the input guards over the request's texts, writing back any rewrite."""
    if isinstance(req, ChatCompletionRequest):
        texts = chain.check_input([m["content"] for m in req.messages])
        req.messages = [{**m, "content": t} for m, t in zip(req.messages, texts)]
    elif isinstance(req.prompt, str):
        req.prompt = chain.check_input([req.prompt])[0]
