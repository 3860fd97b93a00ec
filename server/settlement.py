"""Settlement writes: what the store must record after a request ends (token settlements,
usage records, idempotency outcomes). They must never fail or delay the request itself.

`Settler.write` guarantees: it never raises. The write is tried once now; if the store is
unavailable it is retried in the background (backoff up to `max_backoff` seconds) for up to
`budget_seconds`, then given up, logged and counted as lost (`StoreObserver.lost(kind)`, the
`conveyor_usage_lost_total{kind}` metric). At most `max_pending` writes wait at a time; past
that new failures are lost at once, so an outage cannot grow memory without bound.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from server.store import Store, StoreUnavailable

logger = logging.getLogger("conveyor.server")


@dataclass
class Settler:
    store: Store
    budget_seconds: float = 120.0
    max_backoff: float = 5.0
    max_pending: int = 10_000
    _pending: set[asyncio.Task] = field(default_factory=set)

    @property
    def pending(self) -> int:
        """Writes waiting for the store to come back."""
        return len(self._pending)

    async def write(self, kind: str, what: str, op: Callable[[], Awaitable[object]]) -> None:
        """Runs `op` (a store write) now, or later in the background; never raises.
        `kind` labels the metric (record, tokens, idempotency); `what` goes in the log."""
        try:
            await op()
            return
        except StoreUnavailable:
            pass
        except Exception:  # noqa: BLE001 - a settlement must never break the response
            logger.exception("settlement %s (%s) failed; lost", kind, what)
            self.store.observer.on_lost(kind)
            return
        if len(self._pending) >= self.max_pending:
            self._lose(kind, what, "too many writes already waiting")
            return
        task = asyncio.get_running_loop().create_task(self._retry(kind, what, op))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _retry(self, kind: str, what: str, op: Callable[[], Awaitable[object]]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget_seconds
        delay = 0.1
        while loop.time() + delay < deadline:
            try:
                await asyncio.sleep(delay)
                await op()
            except StoreUnavailable:
                delay = min(delay * 2, self.max_backoff)
                continue
            except asyncio.CancelledError:
                self._lose(kind, what, "the server shut down first")
                raise
            except Exception:  # noqa: BLE001
                logger.exception("settlement %s (%s) failed", kind, what)
                break
            logger.info("settlement %s (%s) written after the store came back", kind, what)
            return
        self._lose(kind, what, f"the store stayed unavailable for {self.budget_seconds:.0f}s")

    def _lose(self, kind: str, what: str, why: str) -> None:
        logger.error("settlement %s (%s) lost: %s", kind, what, why)
        self.store.observer.on_lost(kind)

    async def drain(self, timeout: float) -> int:
        """Waits up to `timeout` seconds for waiting writes (at shutdown); returns how many
        are still waiting (then cancelled and counted lost)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
        left = list(self._pending)
        for task in left:
            task.cancel()
        return len(left)
