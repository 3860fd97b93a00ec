"""The per-request hooks through which the production layer (server/gateway.py) steers a
generation in server/serving.py without serving.py knowing about tenants, limits or caches."""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from engine.outputs import RequestOutput
from server.recorded import RecordedResponse


@dataclass
class RequestHooks:
    """What the production layer (server/gateway.py) adds to one request; the defaults change
    nothing. `on_done` is called exactly once per request that reached the engine, with the
    last output seen (None if none) and, if it completed, its recorded response; completed
    requests await it before the client gets the end of the response."""

    tenant: str | None = None  # for the fair policy; default: the `user` field
    cache_salt: str | None = None
    priority: int | None = None  # default: the request's own
    model_name: str | None = None  # the name in responses; default: served_name()
    headers: dict[str, str] = field(default_factory=dict)
    final_headers: Callable[[RequestOutput], dict[str, str]] | None = None  # JSON responses only
    wrap_stream: Callable[[AsyncIterator[RequestOutput]], AsyncIterator[RequestOutput]] | None = None
    on_done: Callable[[RequestOutput | None, RecordedResponse | None], Awaitable[None]] | None = None


@dataclass
class Finisher:
    """Calls `hooks.on_done` at most once."""

    hooks: RequestHooks
    last: Callable[[], RequestOutput | None]  # the latest output seen
    called: bool = False

    @property
    def listening(self) -> bool:
        return self.hooks.on_done is not None

    async def __call__(self, recorded: RecordedResponse | None) -> None:
        if self.called or self.hooks.on_done is None:
            return
        self.called = True
        await self.hooks.on_done(self.last(), recorded)
