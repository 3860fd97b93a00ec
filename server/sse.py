"""Server-sent events framing: `data: {json}\n\n` per event, `data: [DONE]\n\n` at the end."""
from __future__ import annotations

import json
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"


def sse_event(payload: Any) -> str:
    """One SSE event carrying `payload` as compact JSON on a single line."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response that always closes its body iterator when it ends,
    however it ends (finished, client disconnect, send error), so the generator's cleanup
    (aborting the engine request) runs right away rather than at garbage collection."""

    media_type = "text/event-stream"

    def __init__(self, content: Any, headers: dict[str, str] | None = None) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        super().__init__(content, headers=headers, media_type=self.media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
