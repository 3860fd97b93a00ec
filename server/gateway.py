"""The request pipeline: everything between HTTP and the engines for a generation request,
in order, in `Gateway._pipeline`.

    1 auth (401) -> 2 idempotency (replay / 409 / 422) -> 3 input guards (400) -> 4 route:
    the named model, the tenant's default, or `auto` (403 / 404) -> 5 limits (429; 503
    while the shared store is down, unless fail_open) -> 6 response cache / in-flight dedup
    -> 7 engine, with the tenant's prefix-cache salt, priority and 8 output guards -> 9 settle

`Gateway.handle` authenticates and parses, then drives `_pipeline` (steps 2-9), an async
generator that yields either one recorded response (a replay, a cache or dedup hit) or the
engine's outputs; `handle` answers them as JSON, `event_stream` as a stream. `_pipeline`'s one
`finally` is the settle step: however the request ends (finished, refused, failed, client
gone, timed out, server shutting down) it replaces the rate-limit reservation by the real
usage, ends a dedup lead, writes the usage record, and stores a completed response for the
cache and idempotent replays or frees the idempotency key. Settling never raises, finishes
even if the request's task is cancelled, and a completed stream is settled before its
`[DONE]`. Every response names its model (`X-Conveyor-Model`) and carries the tenant's
`x-ratelimit-*` headers; JSON responses carry their cost (`X-Conveyor-Cost`, US dollars),
replays and cache hits cost 0.

A stage with more to it than a call lives in its own file: the request's state
(server/pipeline_run.py), 6 (server/cache_lookup.py), 7's wait for each output
(server/engine_wait.py), a stream's body (server/event_stream.py), 9 (server/settle.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.outputs import RequestOutput
from server.auth import Authenticator
from server.cache_lookup import cached_answer
from server.config_file import ProductionConfig, TenantConfig
from server.engine_wait import end_waits_by, next_output
from server.errors import APIError
from server.event_stream import event_stream
from server.formatting import usage as output_usage
from server.guardrails import Guard, GuardChain, build_guard
from server.idempotency import HEADER as IDEMPOTENCY_HEADER, Idempotency, check_key, fingerprint
from server.limits import default_max_tokens
from server.pipeline_run import PipelineRun
from server.prod_metrics import ProductionMetrics
from server.protocol import ChatCompletionRequest, GenerationRequest
from server.rate_limit import RateLimiter
from server.recorded import RecordedResponse
from server.request_trace import RequestTrace
from server.response_cache import InFlight, ResponseCache
from server.routing import AUTO, Router
from server.served_models import ModelHandle, ModelSet
from server.serving import ClientGone, output_headers, parse_request, read_json, request_logger
from server.settings import ServerSettings
from server.settle import Settle, model_cost
from server.shutdown import Drain
from server.sse import SSEResponse
from server.store import Store
from server.tracing import Tracing
from server.usage import UsageLog


@dataclass
class Gateway:
    config: ProductionConfig
    models: ModelSet
    store: Store
    metrics: ProductionMetrics
    settings: ServerSettings
    drain: Drain
    tracing: Tracing | None = None  # None: tracing off (no span is ever created)
    auth: Authenticator = field(init=False)
    limiter: RateLimiter = field(init=False)
    idempotency: Idempotency = field(init=False)
    cache: ResponseCache | None = field(init=False)
    inflight: InFlight | None = field(init=False)
    usage: UsageLog = field(init=False)
    guards: dict[str, Guard] = field(init=False)
    settle: Settle = field(init=False)
    _running: set[PipelineRun] = field(default_factory=set)  # runs on an engine, for the drain

    def __post_init__(self) -> None:
        c = self.config
        self.auth = Authenticator(c.tenants)
        self.limiter = RateLimiter(self.store, c.rate_limit_window_seconds, fail_open=c.store.fail_open,
                                   on_reject=lambda t, which: self.metrics.rate_limited.labels(t, which).inc())
        self.idempotency = Idempotency(self.store, c.idempotency.ttl_seconds, c.idempotency.join_in_flight)
        self.cache = ResponseCache(self.store, c.cache.ttl_seconds) if c.cache.response_cache else None
        self.inflight = InFlight() if c.cache.dedup else None
        self.usage = UsageLog(self.store)
        self.guards = {name: build_guard(name, g) for name, g in c.guards.items()}
        self.settle = Settle(self.limiter, self.inflight, self.cache, self.idempotency, self.usage, self.metrics)
        self.drain.on_begin.append(lambda deadline: end_waits_by(self._running, deadline))

    async def close(self, timeout: float = 5.0) -> None:
        """At shutdown, after the last request: waits up to `timeout` seconds for settlements
        still waiting on the store (then they are counted lost), stops refreshing leases."""
        for settler in (self.limiter.settler, self.idempotency.settler, self.usage.settler):
            await settler.drain(timeout)
        await self.limiter.leases.close()

    def tenant(self, request: Request) -> TenantConfig:
        return self.auth.authenticate(request.headers.get("authorization"))

    # ---- 1: auth, then the response ------------------------------------------------------
    async def handle(self, request: Request, chat: bool, api: Any = None) -> Response:
        """The response; the request's trace (span, summary log line) ends here, or, for an
        engine stream, when the pipeline ends."""
        trace = RequestTrace.begin(self.tracing, request.scope["state"]["request_id"], chat, request.headers,
                                   self.settings.log_prompts)
        trace.trace_file = self.settings.trace_file
        try:
            return await self._handle(request, chat, trace, api)
        except APIError as exc:
            trace.failed(exc.status, exc.body()["error"]["code"], exc.message)
            raise
        except Exception:
            trace.failed(500, "internal_error")
            raise
        finally:
            if not trace.streaming:
                trace.end()

    async def _handle(self, request: Request, chat: bool, trace: RequestTrace, api: Any = None) -> Response:
        self.drain.check_admitting()
        log = request_logger(request)
        with trace.phase("auth"):
            tenant = self.tenant(request)
        trace.tenant = log.extra["tenant"] = tenant.name
        body = await read_json(request, self.settings.max_body_bytes)
        # `api` (e.g. /v1/responses) parses its own body into a generation request and formats the answer
        req = api.parse(body) if api is not None else parse_request(body, chat)
        trace.stream, trace.max_tokens, trace.temperature = req.stream, req.max_tokens, req.sampling.get("temperature")
        if trace.log_prompts:
            trace.prompt = req.messages if isinstance(req, ChatCompletionRequest) else req.prompt
        canonical = {k: v for k, v in dataclasses.asdict(req).items() if k != "timeout"}
        canonical["endpoint"] = api.name if api is not None else "chat" if chat else "completions"
        run = PipelineRun(request, tenant, req, body, canonical, log, trace, api=api)
        parts = self._pipeline(run)
        try:
            first = await anext(parts)
            if isinstance(first, RecordedResponse):
                return first.replay(run.headers)
            if req.stream:
                run.streaming = trace.streaming = True  # the pipeline's end ends the trace now
                headers = {**output_headers(first), **run.headers}
                body_events, owned = event_stream(run, first, parts, headers), parts
                parts = None  # the stream's body owns the pipeline now, and the response closes it
                return SSEResponse(body_events, headers=headers, also_close=owned)
            final = first
            while not final.finished:
                final = await anext(parts)
            run.log.info("finished: %s", [c.finish_reason for c in final.outputs])
            headers = {**output_headers(final, generated=True), **run.headers,
                       "X-Conveyor-Cost": f"{model_cost(run.model, output_usage(final)):.8f}"}
            content = run.formatter.response(final)
            run.answer = RecordedResponse(200, headers, body=content, usage=output_usage(final))
            await parts.aclose()  # settles before the client gets the answer
            return JSONResponse(content, headers=headers)
        except ClientGone:
            run.client_gone()
            return Response(status_code=499)
        except APIError as exc:  # recorded before the pipeline's end ends the trace
            trace.failed(exc.status, exc.body()["error"]["code"], exc.message)
            raise
        finally:
            if parts is not None:
                await parts.aclose()

    # ---- 2-9: the pipeline ---------------------------------------------------------------
    async def _pipeline(self, run: PipelineRun) -> AsyncIterator[RecordedResponse | RequestOutput]:
        tenant, req = run.tenant, run.req
        # 2. idempotency: a stored response is replayed; else this request owns the key
        key = run.request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None:
            run.key = check_key(key)
            replay = await self.idempotency.begin(tenant.name, run.key, fingerprint(run.canonical))
            if replay is not None:
                self.metrics.idempotent_replays.inc()
                run.trace.source, run.trace.answered = "replay", True
                run.headers = {**await self.limiter.current_headers(tenant),
                               "Idempotent-Replayed": "true", "X-Conveyor-Cost": "0"}
                yield replay
                return
            run.owns_key = True
        try:
            trace = run.trace
            # 3. input guards (may rewrite the prompt or refuse it)
            with trace.phase("input_guards"):
                guards = self._input_guards(run)
            # 4. route, tokenizing the prompt once
            with trace.phase("route"):
                model, reason, prompt_ids = self._route(tenant, req)
                run.model = model
                trace.model = run.log.extra["model"] = model.name
                trace.base_model = model.base.name
                trace.route = reason
                prep = model.service.prepare(req, prompt_ids)
            trace.max_tokens = prep.max_tokens
            # 5. limits: prompt + max_tokens per choice
            with trace.phase("rate_limit"):
                run.reservation = await self.limiter.reserve(
                    tenant, len(prep.prompt_ids) + prep.max_tokens * prep.params.n)
            self.metrics.routed.labels(model.name, reason).inc()
            run.headers = {**run.reservation.headers, "X-Conveyor-Model": model.name, "X-Conveyor-Route": reason}
            # 6. response cache and in-flight dedup
            with trace.phase("cache_lookup"):
                hit = await cached_answer(run, self.cache, self.inflight, self.metrics)
            if hit is not None:
                trace.source, trace.answered = run.source, True
                yield hit
                return
            # 7-8. the engine, its outputs through the tenant's output guards
            rid = run.request.scope["state"]["request_id"]
            prefix = "chatcmpl" if isinstance(req, ChatCompletionRequest) else "cmpl"
            run.formatter = run.api.formatter(model, req, rid) if run.api is not None else \
                model.service.formatter(req, f"{prefix}-{rid}", model.name)
            if req.timeout is not None:
                run.deadline = asyncio.get_running_loop().time() + req.timeout
            run.log.info("%s: %d prompt tokens, max_tokens=%d, n=%d, stream=%s", prefix,
                         len(prep.prompt_ids), prep.max_tokens, prep.params.n, req.stream)
            trace.priority = req.priority if "priority" in run.body else tenant.priority
            outputs = model.service.generate(
                prep, f"{prefix}-{rid}-{uuid.uuid4().hex[:8]}",  # unique even if a client reuses ids
                cache_salt=f"tenant:{tenant.name}", tenant=tenant.name,
                priority=trace.priority, lora_request=model.lora,
                output_filter=guards.wrap if guards is not None else None)
            self._running.add(run)
            async with contextlib.aclosing(outputs):
                while True:
                    run.last = trace.out = await next_output(run, outputs, self.drain)
                    yield run.last
                    if run.last.finished:
                        return
        except APIError as exc:
            run.trace.failed(exc.status, exc.body()["error"]["code"], exc.message)
            raise
        except (ClientGone, GeneratorExit, asyncio.CancelledError):
            run.trace.gone()  # unless it finished or was answered: then this is the normal close
            raise
        except Exception:
            run.trace.failed(500, "internal_error")
            raise
        finally:
            # 9. settle
            self._running.discard(run)
            await self.settle(run)

    def _input_guards(self, run: PipelineRun) -> GuardChain | None:
        if not run.tenant.guards:
            return None
        count = self.metrics.guard_action
        if run.trace.span is not None:  # with tracing, every guard action is also a span event
            def count(guard: str, action: str, n: int) -> None:
                self.metrics.guard_action(guard, action, n)
                run.trace.event("guardrail", **{"conveyor.guard": guard, "conveyor.guard_action": action,
                                                "conveyor.guard_count": n})
        chain = GuardChain([self.guards[g] for g in run.tenant.guards], count)
        chain.check_request(run.req)
        return chain

    def _route(self, tenant: TenantConfig, req: GenerationRequest) -> tuple[ModelHandle, str, list[int]]:
        """(model, why, prompt token ids). `auto` tokenizes with the first model to route,
        and again only if the chosen model's tokenizer differs."""
        if req.model != AUTO:
            model = self.models.lookup(tenant, req.model)
            model.service.require_ready()
            return model, "explicit" if req.model else "default", model.service.prompt_ids(req)
        probe = self.models.handles[0]
        probe.service.require_ready()
        prompt_ids = probe.service.prompt_ids(req)
        max_tokens = req.max_tokens if req.max_tokens is not None else \
            default_max_tokens(len(prompt_ids), probe.engine.max_model_len, self.settings)
        router = Router(self.config.routing, [m.priced for m in self.models],
                        {name: a.priced for name, a in self.models.adapters.items()})
        decision = router.choose(tenant, len(prompt_ids), max_tokens, _text_of(req))
        model = self.models.get(decision.model)
        model.service.require_ready()
        if not model.shares_tokenizer(probe):
            prompt_ids = model.service.prompt_ids(req)
        return model, decision.reason, prompt_ids


def _text_of(req: GenerationRequest) -> str:
    if isinstance(req, ChatCompletionRequest):
        return "\n".join(m["content"] for m in req.messages)
    return req.prompt if isinstance(req.prompt, str) else ""
