"""Concurrency slots as leases: a slot is a lease id in the store that expires `ttl` seconds
after it was last refreshed, and this replica refreshes all the leases it holds in one store
call every `ttl / 3` seconds while their requests run.

Guarantees: a replica that dies (or a store that restarts with its data, or a release that
could not reach the store) leaks a slot for at most one `ttl`; a count can never go negative
(it is the number of live leases, not a counter); a released lease is never refreshed back
to life. If the store stays unreachable for longer than `ttl`, leases of requests still
running lapse and those requests stop counting against the limit (under-counting, never
over-counting, until they finish).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from server.store import Store, StoreUnavailable

logger = logging.getLogger("conveyor.server")
LEASE_TTL_SECONDS = 30.0


@dataclass
class LeaseKeeper:
    """The leases this replica holds, and the one background task that refreshes them.
    Used only on the server's event loop."""

    store: Store
    ttl: float = LEASE_TTL_SECONDS
    _held: dict[str, set[str]] = field(default_factory=dict)  # store key -> lease ids
    _refresher: asyncio.Task | None = None

    @property
    def held(self) -> int:
        return sum(len(ids) for ids in self._held.values())

    async def acquire(self, key: str, limit: int) -> tuple[str | None, int]:
        """(lease id, live leases after) if fewer than `limit` were live, else (None, live).
        Raises StoreUnavailable."""
        lease = uuid.uuid4().hex
        ok, live = await self.store.lease_acquire(key, lease, limit, self.ttl)
        if not ok:
            return None, live
        self._held.setdefault(key, set()).add(lease)
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_while_held())
        return lease, live

    async def release(self, key: str, lease: str) -> None:
        """Frees the slot now, or (store unreachable) within one ttl. Never raises."""
        ids = self._held.get(key)
        if ids is not None:
            ids.discard(lease)  # first, so no refresh can extend it
            if not ids:
                del self._held[key]
        try:
            await self.store.lease_release(key, lease)
        except StoreUnavailable:
            pass  # not refreshed any more: it lapses within one ttl
        except Exception:  # noqa: BLE001 - a release must never break the response
            logger.exception("lease release failed; it lapses within %.0fs", self.ttl)

    async def _refresh_while_held(self) -> None:
        while self._held:
            await asyncio.sleep(self.ttl / 3)
            snapshot = {key: sorted(ids) for key, ids in self._held.items() if ids}
            if not snapshot:
                continue
            try:
                await self.store.lease_refresh(snapshot, self.ttl)
            except StoreUnavailable:
                pass  # counted by the store; retried at the next tick
            except Exception:  # noqa: BLE001 - keep refreshing whatever happens
                logger.exception("lease refresh failed")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
