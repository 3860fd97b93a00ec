"""The shared-state store: the one small interface through which rate-limit counters,
concurrency leases, idempotency records, cached responses and usage records go.

`MemoryStore` (the default) keeps them in this process; `RedisStore` (server/redis_store.py)
keeps them in Redis, so several stateless replicas behind a load balancer enforce one limit
and see one idempotency record. Both give the same guarantees:
- `incr` is atomic and returns the new value; a key created by it expires after `ttl` seconds.
- `set_if_absent` is atomic: of several concurrent callers exactly one gets True;
  `delete_if` deletes a key only while it still holds the given value.
- values are strings; callers serialize (JSON) themselves.
- `append` keeps at most `max_items` of a list's newest items.
- leases (`lease_acquire` / `lease_refresh` / `lease_release`) are members of a set that
  expire `ttl` seconds after their last acquire or refresh: `lease_acquire` first drops the
  expired ones and adds the lease only while fewer than `limit` are live, atomically, so the
  count of a crashed holder's leases falls back within one ttl and can never go negative.
- a store that cannot be reached raises `StoreUnavailable` (a 503 with Retry-After) quickly,
  never a driver exception and never after seconds of waiting; `healthy` is its last known
  state (Redis: kept fresh by a background ping, so it also turns true again without traffic).
Keys are namespaced by the caller (`rl:`, `idem:`, `cache:`, `usage`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.errors import APIError

RETRY_AFTER_SECONDS = 2


class StoreUnavailable(APIError):
    """The shared store cannot be reached. An APIError (503, `store_unavailable`, Retry-After),
    so wherever it is not handled the client still gets a clean, retryable answer."""

    def __init__(self, op: str = "") -> None:
        super().__init__(503, "The service's shared state store is unavailable; retry shortly.",
                         code="store_unavailable", retry_after=RETRY_AFTER_SECONDS)
        self.op = op


@dataclass
class StoreObserver:
    """Callbacks for metrics: `error(op)` per failed store operation, `lost(kind)` per
    settlement write given up after retrying (see server/settlement.py)."""

    error: Callable[[str], None] | None = None
    lost: Callable[[str], None] | None = None

    def on_error(self, op: str) -> None:
        if self.error is not None:
            self.error(op)

    def on_lost(self, kind: str) -> None:
        if self.lost is not None:
            self.lost(kind)


class Store(Protocol):
    observer: StoreObserver

    @property
    def healthy(self) -> bool: ...
    async def get(self, key: str) -> str | None: ...
    async def set(self, key: str, value: str, ttl: float | None = None) -> None: ...
    async def set_if_absent(self, key: str, value: str, ttl: float | None = None) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def delete_if(self, key: str, value: str) -> bool: ...
    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int: ...
    async def append(self, key: str, value: str, max_items: int | None = None) -> None: ...
    async def items(self, key: str) -> list[str]: ...
    async def lease_acquire(self, key: str, lease: str, limit: int, ttl: float) -> tuple[bool, int]: ...
    async def lease_refresh(self, leases: dict[str, list[str]], ttl: float) -> None: ...
    async def lease_release(self, key: str, lease: str) -> None: ...
    async def lease_count(self, key: str) -> int: ...
    async def close(self) -> None: ...


@dataclass
class MemoryStore:
    """An in-process store. Used only from one event loop, so no locking is needed: every
    method finishes without awaiting, which makes each one atomic on that loop. Always
    healthy."""

    observer: StoreObserver = field(default_factory=StoreObserver)
    _values: dict[str, tuple[str, float | None]] = field(default_factory=dict)
    _lists: dict[str, list[str]] = field(default_factory=dict)
    _leases: dict[str, dict[str, float]] = field(default_factory=dict)  # key -> lease -> expiry

    @property
    def healthy(self) -> bool:
        return True

    def _live(self, key: str) -> str | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= time.monotonic():
            del self._values[key]
            return None
        return entry[0]

    @staticmethod
    def _expiry(ttl: float | None) -> float | None:
        return None if ttl is None else time.monotonic() + ttl

    async def get(self, key: str) -> str | None:
        return self._live(key)

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self._values[key] = (value, self._expiry(ttl))

    async def set_if_absent(self, key: str, value: str, ttl: float | None = None) -> bool:
        if self._live(key) is not None:
            return False
        self._values[key] = (value, self._expiry(ttl))
        return True

    async def delete(self, key: str) -> None:
        self._values.pop(key, None)

    async def delete_if(self, key: str, value: str) -> bool:
        if self._live(key) != value:
            return False
        del self._values[key]
        return True

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        current = self._live(key)
        expiry = self._values[key][1] if current is not None else self._expiry(ttl)
        value = int(current or 0) + amount
        self._values[key] = (str(value), expiry)
        return value

    async def append(self, key: str, value: str, max_items: int | None = None) -> None:
        items = self._lists.setdefault(key, [])
        items.append(value)
        if max_items is not None and len(items) > max_items:
            del items[: len(items) - max_items]

    async def items(self, key: str) -> list[str]:
        return list(self._lists.get(key, []))

    def _live_leases(self, key: str) -> dict[str, float]:
        now = time.monotonic()
        leases = {k: v for k, v in self._leases.get(key, {}).items() if v > now}
        self._leases[key] = leases
        return leases

    async def lease_acquire(self, key: str, lease: str, limit: int, ttl: float) -> tuple[bool, int]:
        leases = self._live_leases(key)
        if len(leases) >= limit:
            return False, len(leases)
        leases[lease] = time.monotonic() + ttl
        return True, len(leases)

    async def lease_refresh(self, leases: dict[str, list[str]], ttl: float) -> None:
        expiry = time.monotonic() + ttl
        for key, ids in leases.items():
            live = self._live_leases(key)
            for lease in ids:
                if lease in live:  # a released or expired lease is never brought back
                    live[lease] = expiry

    async def lease_release(self, key: str, lease: str) -> None:
        self._leases.get(key, {}).pop(lease, None)

    async def lease_count(self, key: str) -> int:
        return len(self._live_leases(key))

    async def close(self) -> None:
        pass


def open_store(redis_url: str | None) -> Store:
    """RedisStore (server/redis_store.py) for a URL, else a fresh MemoryStore."""
    if not redis_url:
        return MemoryStore()
    from server.redis_store import RedisStore  # redis-py is only needed with a URL

    return RedisStore(redis_url)
