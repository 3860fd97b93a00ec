"""Server-sent events framing: `data: {json}\n\n` per event, `data: [DONE]\n\n` at the end."""
from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"


def sse_event(payload: Any) -> str:
    """One SSE event carrying `payload` as compact JSON on a single line."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response that always closes its body iterator (and `also_close`,
    what the body would have closed had it started) when it ends, however it ends (finished,
    client disconnect, send error, even before the body started), so the generator's cleanup
    (aborting the engine request, settling) runs right away rather than at garbage collection."""

    media_type = "text/event-stream"

    def __init__(self, content: Any, headers: dict[str, str] | None = None,
                 also_close: AsyncGenerator | None = None) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        super().__init__(content, headers=headers, media_type=self.media_type)
        self.also_close = also_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                if self.also_close is not None:
                    await self.also_close.aclose()
