"""The shared store in Redis (`--redis-url`): the `Store` interface of server/store.py over
redis-py's asyncio client, with the same guarantees as `MemoryStore`, leases as sorted sets
scored by expiry on the Redis server's clock, and quick, typed failures (`StoreUnavailable`)
when Redis cannot be reached."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from server.store import StoreObserver, StoreUnavailable

logger = logging.getLogger("conveyor.server")
T = TypeVar("T")

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
