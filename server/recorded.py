"""A finished response kept for replay: by idempotency keys and the response cache.

A JSON response keeps its body; a stream keeps its SSE events, so a replay of a stream is a
stream again (byte for byte the same events). Stored as JSON text in the shared store.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.responses import JSONResponse, Response

from server.sse import SSEResponse


@dataclass
class RecordedResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None  # the JSON body of a non-streamed response
    events: list[str] | None = None  # the SSE events of a stream, `data: [DONE]` included
    usage: dict[str, Any] | None = None  # token counts, for usage records of replays

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> "RecordedResponse":
        return cls(**json.loads(text))

    def replay(self, extra_headers: dict[str, str] | None = None) -> Response:
        headers = {**self.headers, **(extra_headers or {})}
        if self.events is not None:
            async def body():
                for event in self.events:
                    yield event
            return SSEResponse(body(), headers=headers)
        return JSONResponse(self.body, status_code=self.status, headers=headers)
