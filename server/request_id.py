"""`RequestIdMiddleware`: every HTTP response carries an `X-Request-Id`, and every request is
logged and counted once.

Guarantees: the client's `X-Request-Id` is kept when it is sane (1-128 of ``[A-Za-z0-9._:-]``),
else a fresh one is made; it is in ``scope["state"]["request_id"]`` for the handlers and echoed
on the response. One log line and one `http_requests{route, status}` count per request, status
499 when the client disconnected first (as nginx logs it); paths outside the server's routes
count as route "other", so the metric's labels stay bounded.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import ServerMetrics

logger = logging.getLogger("conveyor.server")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/models",
           "/tokenize", "/detokenize", "/health", "/ready", "/version", "/metrics", "/admin/metrics",
           "/openapi.json", "/docs", "/v1/usage", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/")


class RequestIdMiddleware:
    """Accepts or generates X-Request-Id, echoes it on the response, logs one line per request
    with it, and counts requests by route and status (499 when the client disconnected first,
    as nginx logs it)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
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
            code = 499 if state.get("client_gone") else status[0]
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self.metrics.http_requests.labels(route, str(code)).inc()
            logger.info("[request_id=%s] %s %s -> %d in %.3fs", rid, scope["method"], scope["path"],
                        code, time.monotonic() - start)
