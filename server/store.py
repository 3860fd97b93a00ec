"""The shared-state store: the one small interface through which rate-limit counters,
concurrency leases, idempotency records, cached responses and usage records go.

`MemoryStore` (the default) keeps them in this process; `RedisStore` keeps them in Redis, so
several stateless replicas behind a load balancer enforce one limit and see one idempotency
record. Both give the same guarantees:
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

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from server.errors import APIError

logger = logging.getLogger("conveyor.server")
T = TypeVar("T")
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


# KEYS[1] the lease set; ARGV: lease id, limit, ttl ms. Scores are expiry times on the Redis
# server's clock, so replicas' clocks never matter. Returns {admitted 0/1, live count}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[2]) then return {0, n} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return {1, n + 1}
"""
# KEYS: lease sets; ARGV[1] ttl ms, ARGV[2..]: "key index:lease id". XX: never resurrects a
# lease that was released or expired meanwhile.
_REFRESH = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  local sep = string.find(ARGV[i], ':', 1, true)
  local key = KEYS[tonumber(string.sub(ARGV[i], 1, sep - 1))]
  redis.call('ZADD', key, 'XX', expiry, string.sub(ARGV[i], sep + 1))
end
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[1])) end
end
return 1
"""
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_COUNT = """
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return redis.call('ZCARD', KEYS[1])
"""


class RedisStore:
    """The store in Redis (redis-py's asyncio client). The client binds to the event loop
    that first uses it, so build one per server (per loop).

    Every call has short socket timeouts (a hung Redis costs the first call one timeout) and
    at most one immediate retry (for a pooled connection that died with a restarted Redis). Once a call fails the store is unhealthy
    and later calls raise `StoreUnavailable` at once instead of each waiting out a timeout;
    a background ping every `ping_interval` seconds (started by the first use on a loop)
    keeps `healthy` current and notices the recovery."""

    def __init__(self, url: str, socket_timeout: float = 1.0, connect_timeout: float = 0.5,
                 ping_interval: float = 0.5) -> None:
        import redis.asyncio as redis  # imported here: only needed with --redis-url
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.ping_interval = ping_interval
        self.observer = StoreObserver()
        self._redis = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            # one immediate retry for a pooled connection that died with a restarted Redis;
            # none after a timeout, which would only double the wait on a hung one
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError, asyncio.TimeoutError)
        self._healthy = True  # optimistic until the first call or ping says otherwise
        self._monitor: asyncio.Task | None = None
        self._scripts = {name: self._redis.register_script(src)
                         for name, src in (("acquire", _ACQUIRE), ("refresh", _REFRESH), ("count", _COUNT),
                                                         ("delete_if", _DELETE_IF))}

    @property
    def healthy(self) -> bool:
        """The last known state; reading it also starts the background ping (inside a loop)."""
        self._ensure_monitor()
        return self._healthy

    def _ensure_monitor(self) -> None:
        if self._monitor is not None and not self._monitor.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._monitor = loop.create_task(self._ping_forever())

    async def _ping_forever(self) -> None:
        while True:
            await self.ping()
            await asyncio.sleep(self.ping_interval)

    async def ping(self) -> bool:
        """Checks the connection now and records the outcome in `healthy`."""
        try:
            await self._redis.ping()
        except self._errors as exc:
            if self._healthy:
                logger.warning("store: Redis at %s is unreachable (%s)", self.url, type(exc).__name__)
            self._healthy = False
        else:
            if not self._healthy:
                logger.warning("store: Redis at %s is reachable again", self.url)
            self._healthy = True
        return self._healthy

    async def _call(self, op: str, work: Callable[[], Awaitable[T]]) -> T:
        self._ensure_monitor()
        if not self._healthy:
            self.observer.on_error(op)
            raise StoreUnavailable(op)
        try:
            return await work()
        except self._errors as exc:
            if self._healthy:
                logger.warning("store: %s failed, Redis at %s is unreachable (%s)", op, self.url,
                               type(exc).__name__)
            self._healthy = False
            self.observer.on_error(op)
            raise StoreUnavailable(op) from None

    async def get(self, key: str) -> str | None:
        return await self._call("get", lambda: self._redis.get(key))

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        await self._call("set", lambda: self._redis.set(key, value, px=_ms(ttl)))

    async def set_if_absent(self, key: str, value: str, ttl: float | None = None) -> bool:
        return bool(await self._call("set_if_absent", lambda: self._redis.set(key, value, px=_ms(ttl), nx=True)))

    async def delete(self, key: str) -> None:
        await self._call("delete", lambda: self._redis.delete(key))

    async def delete_if(self, key: str, value: str) -> bool:
        """Deletes the key only if it still holds `value` (atomically)."""
        return bool(await self._call("delete_if", lambda: self._scripts["delete_if"](keys=[key], args=[value])))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        async def work() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incrby(key, amount)
                if ttl is not None:
                    pipe.pexpire(key, _ms(ttl), nx=True)  # only a key new to this window gets one
                return await pipe.execute()
        return int((await self._call("incr", work))[0])

    async def append(self, key: str, value: str, max_items: int | None = None) -> None:
        async def work() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, value)
                if max_items is not None:
                    pipe.ltrim(key, -max_items, -1)
                return await pipe.execute()
        await self._call("append", work)

    async def items(self, key: str) -> list[str]:
        return await self._call("items", lambda: self._redis.lrange(key, 0, -1))

    async def lease_acquire(self, key: str, lease: str, limit: int, ttl: float) -> tuple[bool, int]:
        ok, n = await self._call("lease_acquire",
                                 lambda: self._scripts["acquire"](keys=[key], args=[lease, limit, _ms(ttl)]))
        return bool(ok), int(n)

    async def lease_refresh(self, leases: dict[str, list[str]], ttl: float) -> None:
        keys = list(leases)
        args: list[Any] = [_ms(ttl)] + [f"{i + 1}:{lease}" for i, k in enumerate(keys) for lease in leases[k]]
        if keys:
            await self._call("lease_refresh", lambda: self._scripts["refresh"](keys=keys, args=args))

    async def lease_release(self, key: str, lease: str) -> None:
        await self._call("lease_release", lambda: self._redis.zrem(key, lease))

    async def lease_count(self, key: str) -> int:
        return int(await self._call("lease_count", lambda: self._scripts["count"](keys=[key])))

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except BaseException:  # noqa: BLE001 - cancelled or bound to a closed loop
                pass
        await self._redis.aclose()


def _ms(ttl: float | None) -> int | None:
    return None if ttl is None else max(1, int(ttl * 1000))


def open_store(redis_url: str | None) -> Store:
    """RedisStore for a URL, else a fresh MemoryStore."""
    return RedisStore(redis_url) if redis_url else MemoryStore()
