"""The Starlette application: routes, the X-Request-Id middleware (server/request_id.py) and
error envelopes.

`build_app(engine, settings)` wires engines to HTTP: one `ModelHandle` per served model, the
request pipeline of server/gateway.py in front of generation (tenants, limits, idempotency,
caching, usage, routing, guardrails; with no config everything is off: open, unlimited).
Every response carries `X-Request-Id` (the client's, when it sent a sane one, else a fresh
one), every error uses OpenAI's envelope, and unexpected failures answer a generic 500 while
the details go to the log. `/health` is liveness (503 when an engine died, or stalled: work
pending and no step completed for `settings.health_stall_seconds`), `/ready` is readiness (503
while loading or stalled, draining after SIGTERM, or while the shared store is down).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import logging
import time
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.async_engine import AsyncEngine
from server.config_file import ModelConfig, ProductionConfig
from server.embeddings_api import EmbeddingsAPI
from server.errors import APIError, internal_error
from server.gateway import Gateway
from server.limits import Admission
from server.lora_api import LoRAAdmin, LoRARoutes, lora_enabled
from server.lora_metrics import LoRAMetrics
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.openapi import build_openapi
from server.pages import page_routes
from server.prod_metrics import ProductionMetrics
from server.protocol import DetokenizeRequest, TokenizeRequest
from server.request_id import RequestIdMiddleware
from server.responses.api import ResponsesAPI
from server.served_models import ModelHandle, ModelSet
from server.serving import ModelService, read_json, request_logger
from server.settings import ServerSettings
from server.shutdown import Drain
from server.store import Store, open_store
from server.tracing import build_tracing
from server.usage import parse_time

logger = logging.getLogger("conveyor.server")


def version() -> str:
    try:
        return importlib.metadata.version("conveyor")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def _model_handle(config: ModelConfig | None, engine: AsyncEngine, settings: ServerSettings,
                  metrics: ServerMetrics, admission: Admission) -> ModelHandle:
    if config is not None:
        settings = dataclasses.replace(settings, served_model_name=config.name)
    model_metrics = metrics.for_model(lambda: service.served_name(), engine.get_stats,
                                      prefix_caching=engine.config.enable_prefix_caching,
                                      progress=engine.progress)
    service = ModelService(engine, settings, model_metrics, admission)
    engine.on_step = lambda info: model_metrics.observe_step(info.duration, info.stats)
    return ModelHandle(config, engine, service, model_metrics)


def _watch_loras(models: ModelSet, metrics: ServerMetrics) -> None:
    """LoRA metrics (server/lora_metrics.py) for the models with LoRA enabled, if any."""
    enabled = [m for m in models if lora_enabled(m)]
    if not enabled:
        return
    lora_metrics = LoRAMetrics(metrics.registry)
    for m in enabled:
        m.service.lora_metrics = lora_metrics
        observe = lora_metrics.watch(m.engine.get_stats, m.engine.config.max_loras)
        on_step = m.engine.on_step
        m.engine.on_step = lambda info, on_step=on_step, observe=observe: (on_step(info), observe(info.stats))


def build_app(engine: AsyncEngine, settings: ServerSettings | None = None,
              shutdown_engine: bool = True, *, production: ProductionConfig | None = None,
              engines: dict[str, AsyncEngine] | None = None, store: Store | None = None,
              unavailable_models: dict[str, str] | None = None, span_exporter: Any = None) -> Starlette:
    """`engine` serves the first available model of `production.models` (or the only model
    when the config lists none); `engines` maps the other available models' names to their
    engines. `unavailable_models` maps optional config models that failed to load to why
    (reported by /health, refused with 503). `store` defaults to Redis at
    `production.redis_url`, else in memory. Tracing (server/tracing.py) is decided here, once:
    on with an OTLP endpoint (settings or OTEL_* variables) or a `span_exporter` (tests)."""
    settings = settings or ServerSettings()
    production = production or ProductionConfig()
    unavailable = dict(unavailable_models or {})
    configs = [m for m in production.models if m.name not in unavailable]
    engines = dict(engines or {})
    if sorted(engines) != sorted(m.name for m in configs[1:]):
        raise ValueError(f"engines must hold the available models after the first one, "
                         f"{[m.name for m in configs[1:]]}; got {sorted(engines)}")
    metrics = ServerMetrics()
    admission = Admission(settings)
    pairs = list(zip(configs, [engine, *(engines[m.name] for m in configs[1:])])) or [(None, engine)]
    models = ModelSet([_model_handle(c, e, settings, metrics, admission) for c, e in pairs], unavailable)
    lora_admin = LoRAAdmin(models)
    _watch_loras(models, metrics)
    owns_store = store is None
    store = store if store is not None else open_store(production.redis_url)
    prod_metrics = ProductionMetrics(metrics.registry, metrics.tenant_registry)
    observer = getattr(store, "observer", None)
    if observer is not None:
        observer.error = lambda op: prod_metrics.store_errors.labels(op).inc()
        observer.lost = lambda kind: prod_metrics.usage_lost.labels(kind).inc()
    drain = Drain(settings.shutdown_timeout, settings.retry_after_seconds)
    tracing = build_tracing(settings.otlp_traces_endpoint, span_exporter)
    gateway = Gateway(production, models, store, prod_metrics, settings, drain, tracing)
    gateway.auth.log_mode()
    openapi = build_openapi(version())

    def api(handler):
        """Maps APIError and unexpected exceptions to envelopes inside the route."""
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as exc:
                request_logger(request).info("error %d: %s", exc.status, exc.message)
                return exc.to_response()
            except Exception:  # noqa: BLE001 - never leak internals to clients
                request_logger(request).exception("unexpected error")
                return internal_error().to_response()
        return endpoint

    async def completions(request: Request) -> Response:
        return await gateway.handle(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await gateway.handle(request, chat=True)

    async def models_route(request: Request) -> Response:
        """Served models, then LoRA adapters (`parent`: the base model, `root`: the adapter's
        path as it was loaded, as vLLM lists them)."""
        allowed = models.allowed(gateway.tenant(request), adapters=True)
        ready = [m for m in allowed if m.engine.is_ready]
        if allowed and not ready:
            allowed[0].service.require_ready()
        return JSONResponse({"object": "list", "data": [{
            "id": m.name, "object": "model", "created": int(time.time()), "owned_by": "conveyor",
            "root": m.lora.lora_path if m.lora is not None else m.name,
            "parent": m.base.name if m.lora is not None else None,
            "max_model_len": m.engine.max_model_len} for m in ready]})

    async def model_request(request: Request, parse: Any) -> tuple[Any, ModelHandle]:
        """The parsed body of a /tokenize or /detokenize request and its (ready) model."""
        tenant = gateway.tenant(request)
        req = parse(await read_json(request, settings.max_body_bytes))
        model = models.lookup(tenant, req.model)
        model.service.require_ready()
        return req, model

    async def tokenize(request: Request) -> Response:
        req, model = await model_request(request, TokenizeRequest.from_json)
        tok = model.engine.tokenizer
        if req.messages is not None:
            text = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": model.engine.max_model_len})

    async def detokenize(request: Request) -> Response:
        req, model = await model_request(request, DetokenizeRequest.from_json)
        tok = model.engine.tokenizer
        if any(t >= len(tok) for t in req.tokens):
            raise APIError(400, f"tokens must be below the vocabulary size {len(tok)}", param="tokens")
        return JSONResponse({"prompt": tok.decode(req.tokens)})

    async def usage_route(request: Request) -> Response:
        """`GET /v1/usage?group_by=tenant|user|feature|model&start=&end=` (admin keys only)."""
        gateway.auth.require_admin(gateway.tenant(request))
        q = request.query_params
        return JSONResponse(await gateway.usage.rollup(
            q.get("group_by", "tenant"), parse_time(q.get("start"), "start"), parse_time(q.get("end"), "end")))

    def model_state(m: ModelHandle) -> dict[str, str]:
        state = m.state()
        if state == "failed":
            return {"name": m.name, "state": state, "reason": "the engine thread stopped"}
        stalled = m.engine.progress().stall_reason(settings.health_stall_seconds) if state == "ready" else None
        return {"name": m.name, "state": "stalled", "reason": stalled} if stalled else {"name": m.name, "state": state}

    def model_states() -> list[dict[str, str]]:
        return [*(model_state(m) for m in models),
                *({"name": name, "state": "unavailable", "reason": why} for name, why in unavailable.items())]

    async def health(request: Request) -> Response:
        """Liveness: 503 when an engine thread died or stalled (restart the process)."""
        states = model_states()
        bad = [s["state"] for s in states if s["state"] in ("failed", "stalled")]
        status = "failed" if "failed" in bad else "stalled" if bad else "ok"
        return JSONResponse({"status": status, "models": states}, status_code=503 if bad else 200)

    async def ready(request: Request) -> Response:
        """Readiness: 200 only when every model can serve, the server is not draining and the
        shared store is reachable (or `[store] fail_open` admits requests without it)."""
        reasons = [f"model {s['name']} is {s['state']}" for s in model_states()
                   if s["state"] not in ("ready", "unavailable")]
        if drain.draining:
            reasons.append("shutting down")
        # With fail_open the replica still serves during an outage (without limits), so it stays
        # ready: otherwise one store outage would take every replica out of the load balancer.
        if not getattr(store, "healthy", True) and not production.store.fail_open:
            reasons.append("the shared store is unreachable")
        body = {"status": "not ready" if reasons else "ready", "reasons": reasons}
        return JSONResponse(body, status_code=503 if reasons else 200,
                            headers={"Retry-After": str(settings.retry_after_seconds)} if reasons else None)

    async def version_route(request: Request) -> Response:
        return JSONResponse({"version": version()})

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def admin_metrics(request: Request) -> Response:
        """The tenant-labelled series (requests, tokens, cost, rate-limit refusals): admin keys only."""
        gateway.auth.require_admin(gateway.tenant(request))
        return Response(metrics.render_tenants(), media_type=CONTENT_TYPE)

    async def openapi_route(request: Request) -> Response:
        return JSONResponse(openapi)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        messages = {404: f"No route {request.url.path}.",
                    405: f"Method {request.method} is not allowed on {request.url.path}."}
        error = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                         code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
        return error.to_response(headers=dict(exc.headers or {}))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        drain.bind(asyncio.get_running_loop())
        for name, why in unavailable.items():
            logger.warning("model %s is unavailable (optional, failed to load): %s", name, why)
        yield
        await gateway.close()
        if tracing is not None:
            tracing.shutdown()
        if shutdown_engine:
            for m in models:
                m.engine.shutdown()
        if owns_store:
            await store.close()

    lora_routes = LoRARoutes(lora_admin, gateway)
    routes = [
        Route("/v1/completions", api(completions), methods=["POST"]),
        Route("/v1/chat/completions", api(chat_completions), methods=["POST"]),
        Route("/v1/responses", api(ResponsesAPI(gateway).handle), methods=["POST"]),
        Route("/v1/embeddings", api(EmbeddingsAPI(gateway).handle), methods=["POST"]),
        Route("/v1/models", api(models_route), methods=["GET"]),
        Route("/tokenize", api(tokenize), methods=["POST"]),
        Route("/detokenize", api(detokenize), methods=["POST"]),
        Route("/v1/usage", api(usage_route), methods=["GET"]),
        Route("/health", api(health), methods=["GET"]),
        Route("/ready", api(ready), methods=["GET"]),
        Route("/version", api(version_route), methods=["GET"]),
        Route("/metrics", api(metrics_route), methods=["GET"]),
        Route("/admin/metrics", api(admin_metrics), methods=["GET"]),
        Route("/openapi.json", api(openapi_route), methods=["GET"]),
        Route("/v1/load_lora_adapter", api(lora_routes.load), methods=["POST"]),
        Route("/v1/unload_lora_adapter", api(lora_routes.unload), methods=["POST"]),
        *page_routes(),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware, metrics=metrics)
    app.state.engine = engine
    app.state.models = models
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.admission = admission
    app.state.gateway = gateway
    app.state.drain = drain
    app.state.lora = lora_admin
    return app
