"""The shared-state store: the one small interface through which rate-limit counters,
idempotency records, cached responses and usage records go.

`MemoryStore` (the default) keeps them in this process; `RedisStore` keeps them in Redis, so
several stateless replicas behind a load balancer enforce one limit and see one idempotency
record. Both give the same guarantees:
- `incr` is atomic and returns the new value; a key created by it expires after `ttl` seconds.
- `set_if_absent` is atomic: of several concurrent callers exactly one gets True.
- values are strings; callers serialize (JSON) themselves.
- `append` keeps at most `max_items` of a list's newest items.
Keys are namespaced by the caller (`rl:`, `idem:`, `cache:`, `usage`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


class Store(Protocol):
    async def get(self, key: str) -> str | None: ...
    async def set(self, key: str, value: str, ttl: float | None = None) -> None: ...
    async def set_if_absent(self, key: str, value: str, ttl: float | None = None) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int: ...
    async def append(self, key: str, value: str, max_items: int | None = None) -> None: ...
    async def items(self, key: str) -> list[str]: ...
    async def close(self) -> None: ...


@dataclass
class MemoryStore:
    """An in-process store. Used only from one event loop, so no locking is needed: every
    method finishes without awaiting, which makes each one atomic on that loop."""

    _values: dict[str, tuple[str, float | None]] = field(default_factory=dict)
    _lists: dict[str, list[str]] = field(default_factory=dict)

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

    async def close(self) -> None:
        pass


class RedisStore:
    """The store in Redis (redis-py's asyncio client). The client binds to the event loop
    that first uses it, so build one per server (per loop)."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis  # imported here: only needed with --redis-url

        self.url = url
        self._redis = redis.Redis.from_url(url, decode_responses=True)

    async def get(self, key: str) -> str | None:
        return await self._redis.get(key)

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        await self._redis.set(key, value, px=_ms(ttl))

    async def set_if_absent(self, key: str, value: str, ttl: float | None = None) -> bool:
        return bool(await self._redis.set(key, value, px=_ms(ttl), nx=True))

    async def delete(self, key: str) -> None:
        await self._redis.delete(key)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, amount)
            if ttl is not None:
                pipe.pexpire(key, _ms(ttl), nx=True)  # only a key new to this window gets one
            value, *_ = await pipe.execute()
        return int(value)

    async def append(self, key: str, value: str, max_items: int | None = None) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, value)
            if max_items is not None:
                pipe.ltrim(key, -max_items, -1)
            await pipe.execute()

    async def items(self, key: str) -> list[str]:
        return await self._redis.lrange(key, 0, -1)

    async def close(self) -> None:
        await self._redis.aclose()


def _ms(ttl: float | None) -> int | None:
    return None if ttl is None else max(1, int(ttl * 1000))


def open_store(redis_url: str | None) -> Store:
    """RedisStore for a URL, else a fresh MemoryStore."""
    return RedisStore(redis_url) if redis_url else MemoryStore()
