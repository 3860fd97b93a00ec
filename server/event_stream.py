"""The body of a streamed (SSE) response: the engine's outputs as formatted events.

Guarantees: the events a replay needs (idempotency, the response cache) are kept only when
the request keeps its answer; the answer is recorded, and the pipeline closed (so settled),
before the final `[DONE]`; after the headers are out an error goes in-band as an error event,
never as a traceback; a disconnect or cancellation marks the client gone and propagates.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from engine.outputs import RequestOutput
from server.errors import APIError, internal_error
from server.formatting import usage as output_usage
from server.pipeline_run import PipelineRun
from server.recorded import RecordedResponse
from server.sse import DONE, sse_event


async def event_stream(run: PipelineRun, first: RequestOutput, parts: AsyncIterator[Any],
                       headers: dict[str, str]) -> AsyncIterator[str]:
    """Yields the events of ``first`` and of the pipeline's further outputs (``parts``, which
    this closes), then `[DONE]` (unless the formatter's API sends none)."""
    out, events = first, []  # events are kept for replays (idempotency, cache)
    try:
        async with contextlib.aclosing(parts):
            while True:
                for chunk in run.formatter.chunks(out):
                    event = chunk if isinstance(chunk, str) else sse_event(chunk)  # str: framed already
                    if run.keeps_answer:
                        events.append(event)
                    yield event
                if out.finished:
                    break
                out = await anext(parts)
            if run.formatter.include_usage:
                events.append(sse_event(run.formatter.usage_chunk(out)))
                yield events[-1]
            run.log.info("stream finished: %s", [c.finish_reason for c in out.outputs])
            done = getattr(run.formatter, "done", DONE)  # the Responses API sends no [DONE]
            run.answer = RecordedResponse(200, headers, events=[*events, *([done] if done else [])],
                                          usage=output_usage(out))
        # leaving `aclosing` ended the pipeline: settled before [DONE]
    except APIError as exc:  # after the headers, errors go in-band
        run.log.info("error %d in the stream: %s", exc.status, exc.message)
        yield exc.to_sse()
    except (GeneratorExit, asyncio.CancelledError):
        run.client_gone()
        raise
    except Exception:  # noqa: BLE001 - never leak internals to clients
        run.log.exception("unexpected error in the stream")
        yield internal_error().to_sse()
    done = getattr(run.formatter, "done", DONE)
    if done:
        yield done
