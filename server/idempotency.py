"""`Idempotency-Key` handling, after the IETF httpapi draft "The Idempotency-Key HTTP Header
Field".

Keys are scoped per tenant and bound to a fingerprint of the canonical request (endpoint,
model, prompt or messages, every sampling parameter, stream flag). Guarantees:
- the first request with a key runs; a retry after it completed gets the stored response
  replayed (a stream as SSE) with `Idempotent-Replayed: true`;
- a retry while the first still runs gets 409 (or, with `join_in_flight`, waits for it and
  gets the replay);
- the same key with a different request gets 422;
- a completed key is remembered for `ttl_seconds` (default 24 h); a request that fails does
  not keep its key, so the client may retry it.
- with the store unreachable `begin` raises StoreUnavailable (503, Retry-After): a key that
  cannot be checked is not run; `complete` and `abandon` never raise (written later by the
  settler, or the running record lapses after 15 minutes).
Records live in the shared store, so a key used on one replica is honoured by all.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.errors import APIError, bad_request
from server.recorded import RecordedResponse
from server.settlement import Settler
from server.store import Store

HEADER = "idempotency-key"
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as a header value
_RUNNING_TTL = 900.0  # a replica that dies mid-request frees the key after this long
_POLL = 0.05


def fingerprint(payload: Any) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of `payload`."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise bad_request("The Idempotency-Key header must be 1 to 255 visible ASCII characters.",
                          "Idempotency-Key", code="invalid_idempotency_key")
    return key


@dataclass
class Idempotency:
    store: Store
    ttl_seconds: float = 24 * 3600.0
    join_in_flight: bool = False
    settler: Settler = field(init=False)
    _owned: dict[str, str] = field(default_factory=dict)  # store key -> our running record

    def __post_init__(self) -> None:
        self.settler = Settler(self.store)

    @staticmethod
    def _key(tenant: str, key: str) -> str:
        return f"idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"

    async def begin(self, tenant: str, key: str, fp: str,
                    wait_limit: float | None = None) -> RecordedResponse | None:
        """None: this request owns the key and must `complete` or `abandon` it. Otherwise
        the stored response to replay. Raises APIError 409 / 422."""
        store_key = self._key(tenant, key)
        running = json.dumps({"state": "running", "fp": fp, "owner": uuid.uuid4().hex})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (wait_limit if wait_limit is not None else _RUNNING_TTL)
        while True:
            if await self.store.set_if_absent(store_key, running, ttl=_RUNNING_TTL):
                self._owned[store_key] = running
                return None
            raw = await self.store.get(store_key)
            if raw is None:
                continue  # it expired or was abandoned between our two calls
            record = json.loads(raw)
            if record["fp"] != fp:
                raise APIError(422, "This Idempotency-Key was already used with a different "
                               "request body.", param="Idempotency-Key",
                               code="idempotency_key_reused")
            if record["state"] == "done":
                return RecordedResponse.loads(record["response"])
            if not self.join_in_flight or loop.time() > deadline:
                raise APIError(409, "A request with this Idempotency-Key is still being processed; "
                               "retry after it finishes.", param="Idempotency-Key",
                               code="idempotency_key_in_use", retry_after=1)
            await asyncio.sleep(_POLL)

    async def complete(self, tenant: str, key: str, fp: str, response: RecordedResponse) -> None:
        """Stores the response for replays; never raises."""
        record = json.dumps({"state": "done", "fp": fp, "response": response.dumps()})
        store_key = self._key(tenant, key)
        self._owned.pop(store_key, None)
        await self.settler.write("idempotency", f"complete key of tenant {tenant}",
                                 lambda: self.store.set(store_key, record, ttl=self.ttl_seconds))

    async def abandon(self, tenant: str, key: str) -> None:
        """Frees the key so the client may retry; never raises. Only our own running record
        is deleted, so a late retry (after an outage) cannot free a key someone else took."""
        store_key = self._key(tenant, key)
        running = self._owned.pop(store_key, None)
        if running is not None:
            await self.settler.write("idempotency", f"abandon key of tenant {tenant}",
                                     lambda: self.store.delete_if(store_key, running))
