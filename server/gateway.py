"""The request pipeline: everything between HTTP and the engines for a generation request,
in order, in this one file.

    1 auth (401) -> 2 idempotency (replay / 409 / 422) -> 3 input guards (400) -> 4 route:
    the named model, the tenant's default, or `auto` (403 / 404) -> 5 limits (429; 503
    while the shared store is down, unless fail_open) -> 6 response cache / in-flight dedup
    -> 7 engine, with the tenant's prefix-cache salt, priority and 8 output guards -> 9 settle

`Gateway.handle` authenticates and parses, then drives `_pipeline` (steps 2-9), an async
generator that yields either one recorded response (a replay, a cache or dedup hit) or the
engine's outputs; `handle` answers them as JSON, `_sse` as a stream. `_pipeline`'s one
`finally` is the settle step: however the request ends (finished, refused, failed, client
gone, timed out, server shutting down) it replaces the rate-limit reservation by the real
usage, ends a dedup lead, writes the usage record, and stores a completed response for the
cache and idempotent replays or frees the idempotency key. Settling never raises, finishes
even if the request's task is cancelled, and a completed stream is settled before its
`[DONE]`. Every response names its model (`X-Conveyor-Model`) and carries the tenant's
`x-ratelimit-*` headers; JSON responses carry their cost (`X-Conveyor-Cost`, US dollars),
replays and cache hits cost 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.async_engine import EngineDeadError
from engine.outputs import RequestOutput
from server.auth import Authenticator
from server.config_file import ProductionConfig, TenantConfig
from server.errors import APIError, bad_request, internal_error, param_from_message
from server.formatting import Formatter, usage as output_usage
from server.guardrails import Guard, GuardChain, build_guard
from server.idempotency import HEADER as IDEMPOTENCY_HEADER, Idempotency, check_key, fingerprint
from server.limits import default_max_tokens
from server.prod_metrics import ProductionMetrics
from server.protocol import ChatCompletionRequest, GenerationRequest
from server.rate_limit import RateLimiter, Reservation
from server.recorded import RecordedResponse
from server.request_trace import RequestTrace
from server.response_cache import InFlight, ResponseCache, is_deterministic
from server.routing import AUTO, Router
from server.served_models import ModelHandle, ModelSet
from server.serving import (PARAM_NAMES, ClientGone, output_headers, parse_request, read_json, request_logger,
                            until_disconnect)
from server.settings import ServerSettings
from server.shutdown import Drain
from server.sse import DONE, SSEResponse, sse_event
from server.store import Store
from server.tracing import Tracing
from server.usage import UsageLog, UsageRecord, cost


@dataclass(eq=False)
class _Run:
    """One generation request on its way through the pipeline: what the settle step needs."""

    request: Request
    tenant: TenantConfig
    req: GenerationRequest
    body: dict
    canonical: dict[str, Any]  # the request as idempotency and the cache see it
    log: logging.LoggerAdapter
    trace: RequestTrace
    key: str | None = None  # Idempotency-Key, validated
    owns_key: bool = False  # this request must complete or abandon the key
    headers: dict[str, str] = field(default_factory=dict)  # added to the response
    model: ModelHandle | None = None
    formatter: Formatter | None = None
    api: Any = None  # another API served on this pipeline (server/responses/api.py); None: chat / completions
    reservation: Reservation | None = None
    cache_fp: str | None = None  # set when the request is cacheable
    leading: bool = False  # runs the engine for an in-flight dedup group
    last: RequestOutput | None = None  # the latest engine output
    answer: RecordedResponse | None = None  # the completed response, however it was produced
    source: str = "engine"  # engine | response (cache) | dedup
    deadline: float | None = None  # the request's own `timeout`, event-loop time
    waiting: Any = None  # the asyncio.Timeout of the current wait for an engine output
    streaming: bool = False  # the stream's headers are out: Starlette notices disconnects

    @property
    def keeps_answer(self) -> bool:
        return self.owns_key or self.cache_fp is not None


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
    _running: set[_Run] = field(default_factory=set)  # runs on an engine, for the drain
    _settling: set[asyncio.Task] = field(default_factory=set)  # settlements under way

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
        self.drain.on_begin.append(self._end_waits_by)

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
        run = _Run(request, tenant, req, body, canonical, log, trace, api=api)
        parts = self._pipeline(run)
        try:
            first = await anext(parts)
            if isinstance(first, RecordedResponse):
                return first.replay(run.headers)
            if req.stream:
                run.streaming = trace.streaming = True  # the pipeline's end ends the trace now
                headers = {**output_headers(first), **run.headers}
                body_events, owned = self._sse(run, first, parts, headers), parts
                parts = None  # the stream's body owns the pipeline now, and the response closes it
                return SSEResponse(body_events, headers=headers, also_close=owned)
            final = first
            while not final.finished:
                final = await anext(parts)
            run.log.info("finished: %s", [c.finish_reason for c in final.outputs])
            headers = {**output_headers(final, generated=True), **run.headers,
                       "X-Conveyor-Cost": f"{_cost(run.model, output_usage(final)):.8f}"}
            content = run.formatter.response(final)
            run.answer = RecordedResponse(200, headers, body=content, usage=output_usage(final))
            await parts.aclose()  # settles before the client gets the answer
            return JSONResponse(content, headers=headers)
        except ClientGone:
            self._client_gone(run)
            return Response(status_code=499)
        except APIError as exc:  # recorded before the pipeline's end ends the trace
            trace.failed(exc.status, exc.body()["error"]["code"], exc.message)
            raise
        finally:
            if parts is not None:
                await parts.aclose()

    async def _sse(self, run: _Run, first: RequestOutput, parts: AsyncIterator[Any],
                   headers: dict[str, str]) -> AsyncIterator[str]:
        out, events = first, []  # events are kept for replays (idempotency, cache)
        try:
            async with contextlib.aclosing(parts):
                while True:
                    for chunk in run.formatter.chunks(out):
                        event = chunk if isinstance(chunk, str) else sse_event(chunk)  # str: framed already
                        if run.keeps_answer:
                            events.append(event)
                        yield event
                    if out.finished:
                        break
                    out = await anext(parts)
                if run.formatter.include_usage:
                    events.append(sse_event(run.formatter.usage_chunk(out)))
                    yield events[-1]
                run.log.info("stream finished: %s", [c.finish_reason for c in out.outputs])
                done = getattr(run.formatter, "done", DONE)  # the Responses API sends no [DONE]
                run.answer = RecordedResponse(200, headers, events=[*events, *([done] if done else [])],
                                              usage=output_usage(out))
            # leaving `aclosing` ended the pipeline: settled before [DONE]
        except APIError as exc:  # after the headers, errors go in-band
            run.log.info("error %d in the stream: %s", exc.status, exc.message)
            yield exc.to_sse()
        except (GeneratorExit, asyncio.CancelledError):
            self._client_gone(run)
            raise
        except Exception:  # noqa: BLE001 - never leak internals to clients
            run.log.exception("unexpected error in the stream")
            yield internal_error().to_sse()
        done = getattr(run.formatter, "done", DONE)
        if done:
            yield done

    def _client_gone(self, run: _Run) -> None:
        run.trace.gone()
        run.log.info("client disconnected, aborted")
        run.request.scope["state"]["client_gone"] = True  # the access metric counts a 499

    # ---- 2-9: the pipeline ---------------------------------------------------------------
    async def _pipeline(self, run: _Run) -> AsyncIterator[RecordedResponse | RequestOutput]:
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
                hit = await self._cached(run)
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
                    run.last = trace.out = await self._next(run, outputs)
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
            await self._settle(run)

    def _input_guards(self, run: _Run) -> GuardChain | None:
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

    async def _cached(self, run: _Run) -> RecordedResponse | None:
        """A cached or deduplicated answer for a deterministic request, else None (and then
        this request may lead its dedup group)."""
        if not is_deterministic(run.req.sampling) or (self.cache is None and self.inflight is None):
            return None
        # an adapter is keyed by its path too: a name reloaded from another folder is another model
        adapter = run.model.lora.lora_path if run.model.lora is not None else None
        run.cache_fp = fingerprint({**{k: v for k, v in run.canonical.items() if k not in ("user", "priority")},
                                    "model": run.model.name, **({"lora_path": adapter} if adapter else {})})
        hit, source = None, ""
        if self.cache is not None:
            hit, source = await self.cache.get(run.tenant.name, run.cache_fp), "response"
        if hit is None and self.inflight is not None:
            group = f"{run.tenant.name}:{run.cache_fp}"
            leader = self.inflight.follow(group)
            hit, source = (await leader if leader is not None else None), "dedup"
            if hit is None:
                self.inflight.lead(group)
                run.leading = True
        if hit is None:
            self.metrics.cache_misses.inc()
            return None
        self.metrics.cache_hits.labels(source).inc()
        run.answer, run.source = hit, source
        run.headers.update({"X-Conveyor-Cache" if source == "response" else "X-Conveyor-Dedup": "hit",
                            "X-Conveyor-Cost": "0"})
        return hit

    async def _next(self, run: _Run, outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
        """The next engine output. Until the stream's headers are out a disconnect ends the
        wait (ClientGone); the request's timeout (408) and the shutdown deadline (503) end it
        too. Engine refusals become API errors."""
        wait = self._wait(run, outputs)
        try:
            return await (wait if run.streaming else until_disconnect(run.request, wait))
        except TimeoutError:
            if self.drain.expired():
                run.log.info("the server is shutting down; request aborted")
                raise self.drain.stopped_error() from None
            run.log.info("timed out after %ss; request aborted", run.req.timeout)
            raise APIError(408, f"The request did not finish within its timeout of {run.req.timeout} seconds.",
                           param="timeout", code="timeout") from None
        except ValueError as exc:
            param = getattr(exc, "param", None) or param_from_message(str(exc), PARAM_NAMES)
            if param == "model" and run.model is not None and run.model.lora is not None:
                # the adapter was unloaded between routing and the engine: as if already gone
                raise APIError(404, f"The model `{run.model.name}` does not exist.", param="model",
                               code="model_not_found") from None
            raise bad_request(str(exc), param) from None
        except EngineDeadError as exc:
            run.log.error("engine unavailable: %s", exc)
            raise APIError(503, "The engine is unavailable.", code="engine_unavailable") from None

    async def _wait(self, run: _Run, outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
        deadlines = [d for d in (run.deadline, self.drain.deadline) if d is not None]
        async with asyncio.timeout_at(min(deadlines) if deadlines else None) as run.waiting:
            try:
                return await anext(outputs)
            except StopAsyncIteration:
                raise RuntimeError("the engine stream ended without a finished output") from None
            finally:
                run.waiting = None

    def _end_waits_by(self, deadline: float) -> None:
        """The drain began: every request still waiting for the engine stops at `deadline`."""
        for run in list(self._running):
            if run.waiting is not None:
                when = run.waiting.when()
                run.waiting.reschedule(deadline if when is None else min(when, deadline))

    async def _settle(self, run: _Run) -> None:
        task = asyncio.ensure_future(self._settle_now(run))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)  # a cancelled request leaves it running, not half done

    async def _settle_now(self, run: _Run) -> None:
        """Settles, then ends a stream's trace (here: a cancelled stream's task stops waiting)."""
        try:
            with run.trace.phase("settle"):
                await self._settle_parts(run)
        finally:
            if run.streaming:
                run.trace.end()

    async def _settle_parts(self, run: _Run) -> None:
        from_engine = run.source == "engine"
        u = (output_usage(run.last) if run.last is not None else None) if from_engine else \
            (run.answer.usage if run.answer is not None else None)
        tenant = run.tenant.name
        if run.reservation is not None:
            await self._quietly(run, "tokens", run.reservation.settle(u["total_tokens"] if from_engine and u else 0))
        if run.leading:
            self.inflight.finish(f"{tenant}:{run.cache_fp}", run.answer)
        if u is not None and run.model is not None:
            m = run.model
            rec = UsageRecord(time.time(), run.request.scope["state"]["request_id"], tenant,
                              run.req.user or run.request.headers.get("x-user-id"), _feature(run), m.name,
                              m.priced.version, u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"],
                              u["completion_tokens"], _cost(m, u) if from_engine else 0.0, run.source,
                              m.base.name)
            await self._quietly(run, "usage", self._account(rec))
        if from_engine and run.answer is not None and self.cache is not None and run.cache_fp is not None:
            await self._quietly(run, "cache", self.cache.put(tenant, run.cache_fp, run.answer))
        if run.owns_key:
            fp = fingerprint(run.canonical)
            await self._quietly(run, "idempotency", self.idempotency.abandon(tenant, run.key) if run.answer is None
                                else self.idempotency.complete(tenant, run.key, fp, run.answer))

    @staticmethod
    async def _quietly(run: _Run, what: str, step: Any) -> None:
        try:
            await step
        except Exception:  # noqa: BLE001 - settling must never break the response
            run.log.exception("settling %s failed", what)

    async def _account(self, rec: UsageRecord) -> None:
        m = self.metrics
        m.tenant_requests.labels(rec.tenant, rec.model).inc()
        m.tenant_tokens.labels(rec.tenant, rec.model, "prompt").inc(rec.prompt_tokens)
        m.tenant_tokens.labels(rec.tenant, rec.model, "cached").inc(rec.cached_tokens)
        m.tenant_tokens.labels(rec.tenant, rec.model, "completion").inc(rec.completion_tokens)
        m.tenant_cost.labels(rec.tenant, rec.model).inc(rec.cost)
        await self.usage.record(rec)


def _cost(model: ModelHandle, u: dict[str, Any]) -> float:
    return cost(model.priced.price, u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"],
                u["completion_tokens"])


def _feature(run: _Run) -> str | None:
    metadata = run.body.get("metadata") if isinstance(run.body.get("metadata"), dict) else {}
    return run.request.headers.get("x-feature-id") or metadata.get("feature")


def _text_of(req: GenerationRequest) -> str:
    if isinstance(req, ChatCompletionRequest):
        return "\n".join(m["content"] for m in req.messages)
    return req.prompt if isinstance(req.prompt, str) else ""
