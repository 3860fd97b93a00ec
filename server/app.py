"""The Starlette application: routes, the X-Request-Id middleware and error envelopes.

`build_app(engine, settings)` wires an `AsyncEngine` to HTTP; with `production` (a loaded
config file) the production layer of server/gateway.py (tenants, limits, idempotency, caching,
usage, routing over several engines, guardrails) sits in front of generation, and with no
config it runs with everything off (open, unlimited). Every response carries
`X-Request-Id` (the client's, when it sent a sane one, else a fresh one), every error uses
OpenAI's envelope, and unexpected failures answer a generic 500 while the details go to the log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import re
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.async_engine import AsyncEngine
from server.config_file import ModelConfig, ProductionConfig
from server.errors import APIError, internal_error
from server.gateway import Gateway
from server.limits import Admission
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.openapi import build_openapi
from server.pages import page_routes
from server.prod_metrics import ProductionMetrics
from server.protocol import DetokenizeRequest, TokenizeRequest
from server.serving import GenerationService, read_json, request_logger
from server.settings import ServerSettings
from server.store import Store, open_store

logger = logging.getLogger("conveyor.server")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
           "/health", "/version", "/metrics", "/openapi.json", "/docs", "/v1/usage", "/")


def version() -> str:
    try:
        return importlib.metadata.version("conveyor")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


class RequestIdMiddleware:
    """Accepts or generates X-Request-Id, echoes it on the response, logs one line per request
    with it, and counts requests by route and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = [500]
        start = time.monotonic()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self.metrics.http_requests.labels(route, str(status[0])).inc()
            logger.info("[request_id=%s] %s %s -> %d in %.3fs", rid, scope["method"], scope["path"],
                        status[0], time.monotonic() - start)


def build_app(engine: AsyncEngine, settings: ServerSettings | None = None,
              shutdown_engine: bool = True, *, production: ProductionConfig | None = None,
              engines: dict[str, AsyncEngine] | None = None, store: Store | None = None) -> Starlette:
    """`engine` serves the first model of `production.models` (or the only model when the
    config lists none); `engines` maps the other configured models' names to their engines.
    `store` defaults to Redis at `production.redis_url`, else in memory."""
    settings = settings or ServerSettings()
    production = production or ProductionConfig()
    engines = dict(engines or {})
    names = [m.name for m in production.models]
    if sorted(engines) != sorted(names[1:]):
        raise ValueError(f"engines must hold the models after the first one, {names[1:]}; got {sorted(engines)}")
    if names and settings.served_model_name is None:
        settings = dataclasses.replace(settings, served_model_name=names[0])
    metrics = ServerMetrics(engine.get_stats, lambda: service.served_name(),
                            prefix_caching=engine.config.enable_prefix_caching)
    engine.on_step = lambda info: metrics.observe_step(info.duration, info.stats)
    admission = Admission(settings)
    service = GenerationService(engine, settings, metrics, admission)
    services: list[tuple[ModelConfig | None, GenerationService]] = [
        (production.models[0] if names else None, service)]
    for cfg in production.models[1:]:
        services.append((cfg, GenerationService(
            engines[cfg.name], dataclasses.replace(settings, served_model_name=cfg.name), metrics, admission)))
    owns_store = store is None
    store = store if store is not None else open_store(production.redis_url)
    gateway = Gateway(production, services, store, ProductionMetrics(metrics.registry))
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

    def require_ready() -> None:
        if not engine.is_ready:
            raise APIError(503, "The engine is not ready." if engine.errored is None else
                           "The engine stopped after an error.", code="engine_not_ready",
                           retry_after=settings.retry_after_seconds)

    async def completions(request: Request) -> Response:
        return await gateway.handle(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await gateway.handle(request, chat=True)

    async def models(request: Request) -> Response:
        tenant = gateway.tenant(request)
        require_ready()
        return JSONResponse({"object": "list", "data": [{
            "id": m.config.name, "object": "model", "created": int(time.time()),
            "owned_by": "conveyor", "root": m.service.engine.model_name,
            "max_model_len": m.service.engine.max_model_len}
            for m in gateway.allowed(tenant) if m.service.engine.is_ready]})

    def engine_for(request: Request, model: str | None) -> AsyncEngine:
        chosen = gateway.model_for(gateway.tenant(request), model).service.engine
        if not chosen.is_ready:
            raise APIError(503, "The engine is not ready.", code="engine_not_ready",
                           retry_after=settings.retry_after_seconds)
        return chosen

    async def tokenize(request: Request) -> Response:
        gateway.tenant(request)
        req = TokenizeRequest.from_json(await read_json(request, settings.max_body_bytes))
        require_ready()
        tok = engine_for(request, req.model).tokenizer
        if req.messages is not None:
            text = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len})

    async def detokenize(request: Request) -> Response:
        gateway.tenant(request)
        req = DetokenizeRequest.from_json(await read_json(request, settings.max_body_bytes))
        require_ready()
        tok = engine_for(request, req.model).tokenizer
        if any(t >= len(tok) for t in req.tokens):
            raise APIError(400, f"tokens must be below the vocabulary size {len(tok)}",
                           param="tokens")
        return JSONResponse({"prompt": tok.decode(req.tokens)})

    async def usage_route(request: Request) -> Response:
        return await gateway.usage_report(request)

    async def health(request: Request) -> Response:
        require_ready()
        return JSONResponse({"status": "ok"})

    async def version_route(request: Request) -> Response:
        return JSONResponse({"version": version()})

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

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
        yield
        if shutdown_engine:
            for e in [engine, *engines.values()]:
                e.shutdown()
        if owns_store:
            await store.close()

    routes = [
        Route("/v1/completions", api(completions), methods=["POST"]),
        Route("/v1/chat/completions", api(chat_completions), methods=["POST"]),
        Route("/v1/models", api(models), methods=["GET"]),
        Route("/tokenize", api(tokenize), methods=["POST"]),
        Route("/detokenize", api(detokenize), methods=["POST"]),
        Route("/v1/usage", api(usage_route), methods=["GET"]),
        Route("/health", api(health), methods=["GET"]),
        Route("/version", api(version_route), methods=["GET"]),
        Route("/metrics", api(metrics_route), methods=["GET"]),
        Route("/openapi.json", api(openapi_route), methods=["GET"]),
        *page_routes(),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware, metrics=metrics)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.admission = admission
    app.state.gateway = gateway
    return app
