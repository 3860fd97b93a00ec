"""The pipeline's wait for the engine's next output (server/gateway.py, step 7).

Guarantees: until a stream's headers are out, a client disconnect ends the wait (`ClientGone`);
the request's own ``timeout`` ends it with a 408, the shutdown deadline with a 503; the engine's
refusals become 4xx errors naming the field (an adapter unloaded after routing: 404 on
``model``), a dead engine a 503. ``run.waiting`` is the wait's `asyncio.Timeout` while it lasts,
so a drain that begins can move its deadline earlier.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine.async_engine import EngineDeadError
from engine.outputs import RequestOutput
from server.errors import APIError, bad_request, param_from_message
from server.pipeline_run import PipelineRun
from server.serving import PARAM_NAMES, until_disconnect
from server.shutdown import Drain


async def next_output(run: PipelineRun, outputs: AsyncIterator[RequestOutput], drain: Drain) -> RequestOutput:
    """The next engine output of ``run``."""
    wait = _wait(run, outputs, drain)
    try:
        return await (wait if run.streaming else until_disconnect(run.request, wait))
    except TimeoutError:
        if drain.expired():
            run.log.info("the server is shutting down; request aborted")
            raise drain.stopped_error() from None
        run.log.info("timed out after %ss; request aborted", run.req.timeout)
        raise APIError(408, f"The request did not finish within its timeout of {run.req.timeout} seconds.",
                       param="timeout", code="timeout") from None
    except ValueError as exc:
        param = getattr(exc, "param", None) or param_from_message(str(exc), PARAM_NAMES)
        if param == "model" and run.model is not None and run.model.lora is not None:
            # the adapter was unloaded between routing and the engine: as if already gone
            raise APIError(404, f"The model `{run.model.name}` does not exist.", param="model",
                           code="model_not_found") from None
        raise bad_request(str(exc), param) from None
    except EngineDeadError as exc:
        run.log.error("engine unavailable: %s", exc)
        raise APIError(503, "The engine is unavailable.", code="engine_unavailable") from None


async def _wait(run: PipelineRun, outputs: AsyncIterator[RequestOutput], drain: Drain) -> RequestOutput:
    deadlines = [d for d in (run.deadline, drain.deadline) if d is not None]
    async with asyncio.timeout_at(min(deadlines) if deadlines else None) as run.waiting:
        try:
            return await anext(outputs)
        except StopAsyncIteration:
            raise RuntimeError("the engine stream ended without a finished output") from None
        finally:
            run.waiting = None


def end_waits_by(runs: set[PipelineRun], deadline: float) -> None:
    """The drain began: every run still waiting for the engine stops at ``deadline``."""
    for run in list(runs):
        if run.waiting is not None:
            when = run.waiting.when()
            run.waiting.reschedule(deadline if when is None else min(when, deadline))
