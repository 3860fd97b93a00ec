"""Per-tenant rate limits: requests per minute, tokens per minute and concurrent requests.

Counters live in the shared store, in fixed windows (`rl:{tenant}:tok:{window index}`), so
every replica on the same store enforces one limit; concurrent requests are leases
(`rl:{tenant}:conc`, server/leases.py) refreshed while the request runs, so a crashed replica
or a restarted store frees its slots within one lease ttl (30 s). Guarantees:
- Admission reserves `prompt tokens + max_tokens` and one request; if any limit would be
  exceeded, nothing stays reserved and the caller gets a 429 with `Retry-After`.
- When the store is unreachable, admission raises `StoreUnavailable` (503 with Retry-After),
  or with `fail_open` admits the request without limits (nothing reserved, no headers).
- `Reservation.settle(actual)` (called once when the request ends, however it ends) replaces
  the reservation by the real usage and frees the concurrency slot. It never raises: a
  settlement the store cannot take now is retried in the background (server/settlement.py).
- `headers` are OpenAI's `x-ratelimit-*` for the tenant's state after the decision.
Counting first and undoing on refusal keeps each check one atomic store call; two racing
requests may both be refused near the limit, but never both admitted past it.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.config_file import TenantConfig
from server.errors import APIError
from server.leases import LEASE_TTL_SECONDS, LeaseKeeper
from server.settlement import Settler
from server.store import Store, StoreUnavailable

logger = logging.getLogger("conveyor.server")


def duration(seconds: float) -> str:
    """OpenAI's reset format: '850ms', '17s', '6m0s'."""
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


@dataclass
class Reservation:
    limiter: "RateLimiter"
    tenant: TenantConfig
    window: int
    tokens: int  # tokens reserved in the window (0 when none were)
    lease: str | None = None  # the concurrency slot held
    headers: dict[str, str] = field(default_factory=dict)
    unlimited: bool = False  # admitted without limits (fail_open during a store outage)
    settled: bool = False

    async def settle(self, actual_tokens: int) -> None:
        """Idempotent (the first call counts, later ones do nothing); never raises."""
        if self.settled:
            return
        self.settled = True
        lim, name = self.limiter, self.tenant.name
        if self.lease is not None:
            await lim.leases.release(f"rl:{name}:conc", self.lease)
        if self.tenant.tokens_per_minute is not None and not self.unlimited \
                and actual_tokens != self.tokens:
            key, delta = f"rl:{name}:tok:{self.window}", actual_tokens - self.tokens
            await lim.settler.write("tokens", f"tenant {name}: {delta:+d} tokens",
                                    lambda: lim.store.incr(key, delta, ttl=2 * lim.window_seconds))


@dataclass
class RateLimiter:
    store: Store
    window_seconds: float = 60.0
    on_reject: Callable[[str, str], None] | None = None  # (tenant, which limit)
    fail_open: bool = False  # store unreachable: admit without limits instead of 503
    lease_seconds: float = LEASE_TTL_SECONDS
    leases: LeaseKeeper = field(init=False)
    settler: Settler = field(init=False)

    def __post_init__(self) -> None:
        self.leases = LeaseKeeper(self.store, self.lease_seconds)
        self.settler = Settler(self.store)

    def _window(self) -> tuple[int, float]:
        now = time.time()
        index = int(now // self.window_seconds)
        return index, (index + 1) * self.window_seconds - now

    async def reserve(self, tenant: TenantConfig, tokens: int) -> Reservation:
        """Reserves one request and `tokens` tokens, or raises APIError(429); with the store
        unreachable raises StoreUnavailable(503), or with `fail_open` admits unlimited."""
        window, _ = self._window()
        res = Reservation(self, tenant, window, 0)
        undo: list[tuple[str, int, float]] = []
        try:
            return await self._reserve(tenant, tokens, res, undo)
        except StoreUnavailable:
            await self._undo(res, undo)
            if not self.fail_open:
                raise
            logger.debug("store unavailable: tenant %s admitted without limits (fail_open)", tenant.name)
            return Reservation(self, tenant, window, 0, unlimited=True)

    async def _undo(self, res: Reservation, undo: list[tuple[str, int, float]]) -> None:
        """Takes back what a refused (or failed) admission counted; never raises."""
        if res.lease is not None:
            await self.leases.release(f"rl:{res.tenant.name}:conc", res.lease)
            res.lease = None
        for key, amount, key_ttl in undo:
            await self.settler.write("tokens", f"undo {key}",
                                     lambda key=key, amount=amount, key_ttl=key_ttl:
                                     self.store.incr(key, -amount, ttl=key_ttl))

    async def _reserve(self, tenant: TenantConfig, tokens: int, res: Reservation,
                       undo: list[tuple[str, int, float]]) -> Reservation:
        window, reset = res.window, self._window()[1]
        name, ttl = tenant.name, 2 * self.window_seconds

        async def refuse(which: str, message: str, retry_after: float, headers: dict) -> APIError:
            await self._undo(res, undo)
            if self.on_reject is not None:
                self.on_reject(name, which)
            return APIError(429, message, code="rate_limit_exceeded",
                            retry_after=max(1, math.ceil(retry_after)), headers=headers)

        used_req = used_tok = None
        if tenant.max_concurrent is not None:
            res.lease, _ = await self.leases.acquire(f"rl:{name}:conc", tenant.max_concurrent)
            if res.lease is None:
                headers = await self._headers(tenant, window, reset)
                raise await refuse("concurrent", f"Too many concurrent requests for tenant {name}: "
                                   f"limit {tenant.max_concurrent}. Retry when one finishes.",
                                   1, headers)
        if tenant.requests_per_minute is not None:
            key = f"rl:{name}:req:{window}"
            used_req = await self.store.incr(key, 1, ttl=ttl)
            undo.append((key, 1, ttl))
            if used_req > tenant.requests_per_minute:
                headers = self._format(tenant, used_req - 1, None, reset)
                raise await refuse("requests", f"Rate limit reached for requests per minute for "
                                   f"tenant {name}: limit {tenant.requests_per_minute}, used "
                                   f"{used_req - 1}. Please try again in {duration(reset)}.",
                                   reset, headers)
        if tenant.tokens_per_minute is not None:
            key = f"rl:{name}:tok:{window}"
            used_tok = await self.store.incr(key, tokens, ttl=ttl)
            undo.append((key, tokens, ttl))
            if used_tok > tenant.tokens_per_minute:
                headers = self._format(tenant, None if used_req is None else used_req - 1,
                                       used_tok - tokens, reset)
                too_big = tokens > tenant.tokens_per_minute
                raise await refuse("tokens", f"Rate limit reached for tokens per minute for tenant "
                                   f"{name}: limit {tenant.tokens_per_minute}, used "
                                   f"{used_tok - tokens}, requested {tokens} (prompt + max_tokens)."
                                   + (" The request alone exceeds the limit: lower max_tokens."
                                      if too_big else f" Please try again in {duration(reset)}."),
                                   reset, headers)
        res.tokens = tokens
        res.headers = self._format(tenant, used_req, used_tok, reset)
        return res

    async def _headers(self, tenant: TenantConfig, window: int, reset: float) -> dict[str, str]:
        req = await self.store.get(f"rl:{tenant.name}:req:{window}")
        tok = await self.store.get(f"rl:{tenant.name}:tok:{window}")
        return self._format(tenant, int(req or 0), int(tok or 0), reset)

    async def current_headers(self, tenant: TenantConfig) -> dict[str, str]:
        """The tenant's headers now, without reserving anything (for replays); none while
        the store is unreachable."""
        window, reset = self._window()
        try:
            return await self._headers(tenant, window, reset)
        except StoreUnavailable:
            return {}

    @staticmethod
    def _format(tenant: TenantConfig, used_req: int | None, used_tok: int | None,
                reset: float) -> dict[str, str]:
        h: dict[str, str] = {}
        if tenant.requests_per_minute is not None:
            h["x-ratelimit-limit-requests"] = str(tenant.requests_per_minute)
            h["x-ratelimit-remaining-requests"] = str(max(0, tenant.requests_per_minute - (used_req or 0)))
            h["x-ratelimit-reset-requests"] = duration(reset)
        if tenant.tokens_per_minute is not None:
            h["x-ratelimit-limit-tokens"] = str(tenant.tokens_per_minute)
            h["x-ratelimit-remaining-tokens"] = str(max(0, tenant.tokens_per_minute - (used_tok or 0)))
            h["x-ratelimit-reset-tokens"] = duration(reset)
        return h
