"""Cost attribution: one usage record per request, priced per model, rolled up on demand.

Each record names the tenant, user (`user` field or `X-User-Id`), feature (`X-Feature-Id`
or `metadata.feature`), model and model version, the token counts and the cost in US dollars
from the model's price table. Records are appended to the shared store, so `GET /v1/usage`
on any replica sees every replica's requests. `record` never raises: while the store is
unreachable a record waits in the background and is written when it comes back, or is
counted lost (`conveyor_usage_lost_total{kind="record"}`) after the settler's budget.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from server.config_file import PriceConfig
from server.errors import bad_request
from server.settlement import Settler
from server.store import Store

GROUPS = ("tenant", "user", "feature", "model")
_KEY = "usage"
MAX_RECORDS = 1_000_000  # the newest records kept in the store; export older ones elsewhere


def cost(price: PriceConfig, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
    """Dollars for one request: uncached prompt, cached prompt and completion tokens each at
    their price per 1000."""
    cached_price = price.prompt_per_1k if price.cached_per_1k is None else price.cached_per_1k
    return ((prompt_tokens - cached_tokens) * price.prompt_per_1k + cached_tokens * cached_price
            + completion_tokens * price.completion_per_1k) / 1000.0


@dataclass
class UsageRecord:
    time: float  # unix seconds when the request finished
    request_id: str
    tenant: str
    user: str | None
    feature: str | None
    model: str
    model_version: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost: float
    source: str = "engine"  # engine | response (the cache) | dedup; the last two cost nothing
    base_model: str | None = None  # the model that ran it: `model` itself, or a LoRA adapter's base


@dataclass
class UsageLog:
    store: Store
    settler: Settler = field(init=False)

    def __post_init__(self) -> None:
        self.settler = Settler(self.store)

    async def record(self, rec: UsageRecord) -> None:
        """Appends the record now or later; never raises."""
        line = json.dumps(asdict(rec), separators=(",", ":"))
        await self.settler.write("record", f"usage of request {rec.request_id}",
                                 lambda: self.store.append(_KEY, line, MAX_RECORDS))

    async def records(self) -> list[UsageRecord]:
        return [UsageRecord(**json.loads(r)) for r in await self.store.items(_KEY)]

    async def rollup(self, group_by: str, start: float | None, end: float | None) -> dict[str, Any]:
        """Totals per group for records with start <= time < end (unix seconds)."""
        if group_by not in GROUPS:
            raise bad_request(f"group_by must be one of {', '.join(GROUPS)}, got {group_by!r}",
                              "group_by")
        totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for rec in await self.records():
            if (start is not None and rec.time < start) or (end is not None and rec.time >= end):
                continue
            row = totals[getattr(rec, group_by) or "unknown"]
            row["requests"] += 1
            for name in ("prompt_tokens", "cached_tokens", "completion_tokens", "cost"):
                row[name] += getattr(rec, name)
        data = [{group_by: key, "requests": int(row["requests"]),
                 "prompt_tokens": int(row["prompt_tokens"]), "cached_tokens": int(row["cached_tokens"]),
                 "completion_tokens": int(row["completion_tokens"]), "cost": round(row["cost"], 10)}
                for key, row in sorted(totals.items())]
        return {"object": "list", "group_by": group_by, "start": start, "end": end, "data": data}


def parse_time(value: str | None, name: str) -> float | None:
    """A unix timestamp or ISO-8601 time from a query parameter; 400 naming it otherwise."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if number != number or number in (float("inf"), float("-inf")):  # "1e400", "nan"
            raise bad_request(f"{name} must be a finite unix timestamp or an ISO-8601 time", name)
        return number
    from datetime import datetime, timezone

    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request(f"{name} must be a unix timestamp or an ISO-8601 time, got {value!r}",
                          name) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()
