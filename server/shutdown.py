"""Bounded graceful shutdown (`--shutdown-timeout`, default 30 s).

`Drain.begin()` (from any thread; `serve` calls it on SIGTERM / SIGINT) guarantees:
- from then on new generation requests get 503 `server_shutting_down` with Retry-After, and
  `/ready` answers 503, so a load balancer stops sending traffic;
- requests already running continue until `timeout_seconds` after `begin`; at that deadline
  every one still waiting on an engine is ended: a stream gets an in-band error event and
  `data: [DONE]`, a JSON request a 503, and its engine request is aborted (KV blocks freed).
uvicorn's own graceful-shutdown timeout is set a little past the deadline, as a backstop.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.errors import APIError

logger = logging.getLogger("conveyor.server")
_BACKSTOP_SECONDS = 5.0  # uvicorn gives up on connections this long after our deadline


@dataclass
class Drain:
    timeout_seconds: float = 30.0
    retry_after_seconds: int = 1
    deadline: float | None = None  # event-loop time at which running requests are ended
    on_begin: list[Callable[[float], None]] = field(default_factory=list)  # called with the deadline
    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the server runs on (at startup)."""
        self._loop = loop

    def begin(self) -> None:
        """Starts draining; idempotent, safe from any thread and from signal handlers."""
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        if self.deadline is not None:
            return
        self.deadline = self._loop.time() + self.timeout_seconds
        logger.warning("shutting down: new requests are refused; running requests have %g s to finish",
                       self.timeout_seconds)
        for callback in self.on_begin:
            callback(self.deadline)

    def expired(self) -> bool:
        return self.deadline is not None and self._loop is not None and self._loop.time() >= self.deadline

    def stopped_error(self) -> APIError:
        return APIError(503, "The server is shutting down; the request was stopped. Retry it.",
                        code="server_shutting_down", retry_after=self.retry_after_seconds)

    def check_admitting(self) -> None:
        """503 with Retry-After once draining began."""
        if self.deadline is not None:
            raise APIError(503, "The server is shutting down; retry on another replica.",
                           code="server_shutting_down", retry_after=self.retry_after_seconds)


def serve(app: Any, *, host: str, port: int, log_level: str = "info", json_logs: bool = False) -> None:
    """Runs `app` (from server.app.build_app) with uvicorn; SIGTERM or SIGINT begin the drain
    (`app.state.drain`, timeout from ServerSettings.shutdown_timeout) as uvicorn stops accepting
    connections, and uvicorn waits for the running requests at most until shortly after it.
    With `json_logs` uvicorn keeps the root logger's (JSON) handlers instead of its own."""
    import uvicorn

    drain: Drain = app.state.drain

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            drain.begin()
            super().handle_exit(sig, frame)

    extra = {"log_config": None} if json_logs else {}
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **extra,
                            timeout_graceful_shutdown=drain.timeout_seconds + _BACKSTOP_SECONDS)
    _DrainingServer(config).run()
