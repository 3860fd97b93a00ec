"""What callers hand `AsyncEngine`'s engine thread, and how that thread applies it.

`CommandQueue` is the thread-safe inbox; the engine thread takes everything in it between
steps (`take`) and applies each command with `apply`. Guarantees of `apply`: it never raises.
A request the engine refuses resolves its ``accepted`` future with the ValueError; any other
failure to add it resolves it with a `RequestFailedError`, and a failed abort or engine call is
logged, so one bad command never stops the engine thread. A request whose caller left before
it was applied is aborted at once. Futures are resolved on their own event loop.
"""
from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from engine.errors import RequestFailedError
from engine.request_streams import RequestStreams, resolve

logger = logging.getLogger("conveyor.async_engine")


@dataclass
class AddRequest:
    request_id: str
    prompt: str | list[int]
    params: Any
    kwargs: dict
    accepted: asyncio.Future  # resolved on the caller's loop: None, or the error to raise


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class EngineCall:
    """An engine method to run on the engine thread between steps (LoRA load / unload)."""

    method: str
    args: tuple
    done: asyncio.Future  # resolved on the caller's loop: (result, error or None)


Command = AddRequest | AbortRequest | EngineCall


class CommandQueue:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, command: Command) -> None:
        self._queue.put(command)

    def empty(self) -> bool:
        return self._queue.empty()

    def take(self) -> Iterator[Command]:
        """The queued commands, oldest first, including any put while iterating."""
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return

    def fail_waiting(self, error: BaseException) -> None:
        """Callers still waiting for a request to be accepted, or for an engine call, get
        ``error``; queued aborts are dropped."""
        for command in self.take():
            if isinstance(command, (AddRequest, EngineCall)):
                future = command.accepted if isinstance(command, AddRequest) else command.done
                value = error if isinstance(command, AddRequest) else (None, error)
                try:
                    future.get_loop().call_soon_threadsafe(resolve, future, value)
                except RuntimeError:
                    pass


def apply(engine: Any, command: Command, streams: RequestStreams) -> None:
    """Applies one command to ``engine`` (on the engine thread)."""
    if isinstance(command, EngineCall):
        _run_call(engine, command)
        return
    if isinstance(command, AbortRequest):
        try:
            engine.abort_request(command.request_id)
        except Exception:  # noqa: BLE001 - one bad abort must not stop the engine
            logger.exception("aborting request %s failed", command.request_id)
        return
    error: BaseException | None = None
    try:
        engine.add_request(command.request_id, command.prompt, command.params, **command.kwargs)
    except ValueError as exc:
        error = exc
    except Exception as exc:  # noqa: BLE001 - a request the engine chokes on fails alone
        logger.exception("adding request %s failed", command.request_id)
        error = RequestFailedError(f"the engine could not accept the request ({type(exc).__name__})")
    stream = streams.get(command.request_id)
    if stream is None:  # the caller left before we got here
        if error is None:
            engine.abort_request(command.request_id)
        return
    stream.loop.call_soon_threadsafe(resolve, command.accepted, error)


def _run_call(engine: Any, command: EngineCall) -> None:
    result, error = None, None
    try:
        result = getattr(engine, command.method)(*command.args)
    except ValueError as exc:  # LoRAError: the caller's bad input
        error = exc
    except Exception as exc:  # noqa: BLE001 - a failed load must not stop the engine
        logger.exception("%s failed", command.method)
        error = RuntimeError(f"{command.method} failed ({type(exc).__name__})")
    try:
        command.done.get_loop().call_soon_threadsafe(resolve, command.done, (result, error))
    except RuntimeError:  # the caller's loop is closed
        pass
