"""Answering deterministic requests without the GPU: a response cache (shared store, TTL)
and in-flight de-duplication (this replica).

A request is deterministic when its output is a function of the request alone: greedy
(`temperature == 0`) or seeded. Both pieces are opt-in and keyed by tenant + the request's
fingerprint, so tenants never see each other's outputs. Guarantees:
- `ResponseCache.get` returns only a response stored for the same tenant and fingerprint
  within `ttl_seconds`; a store outage is a miss, never an error;
- `InFlight`: of identical concurrent requests one leads (runs the engine); the others await
  its recorded response, or `None` if it failed, in which case they run on their own.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from server.recorded import RecordedResponse
from server.store import Store, StoreUnavailable


def is_deterministic(sampling: dict) -> bool:
    return sampling.get("temperature") == 0.0 or sampling.get("seed") is not None


@dataclass
class ResponseCache:
    store: Store
    ttl_seconds: float = 300.0

    async def get(self, tenant: str, fp: str) -> RecordedResponse | None:
        """The stored response, or None (also while the store is unreachable: a miss)."""
        try:
            raw = await self.store.get(f"cache:{tenant}:{fp}")
        except StoreUnavailable:
            return None
        return None if raw is None else RecordedResponse.loads(raw)

    async def put(self, tenant: str, fp: str, response: RecordedResponse) -> None:
        """Stores the response; while the store is unreachable it is simply not cached."""
        try:
            await self.store.set(f"cache:{tenant}:{fp}", response.dumps(), ttl=self.ttl_seconds)
        except StoreUnavailable:
            pass


@dataclass
class InFlight:
    """Used only on the server's event loop."""

    _leaders: dict[str, asyncio.Future] = field(default_factory=dict)

    def follow(self, key: str) -> asyncio.Future | None:
        """The leader's future for `key`, or None if there is no leader (then call `lead`)."""
        return self._leaders.get(key)

    def lead(self, key: str) -> None:
        self._leaders[key] = asyncio.get_running_loop().create_future()

    def finish(self, key: str, response: RecordedResponse | None) -> None:
        future = self._leaders.pop(key, None)
        if future is not None and not future.done():
            future.set_result(response)
