"""`RequestStreams`: the per-request output queues of `AsyncEngine`, shared by the callers'
event loops and the engine thread.

Guarantees: the registry is safe from any thread (one lock); a request id has at most one open
stream; items reach a stream's queue only on its own event loop (`call_soon_threadsafe`), one
wake-up per event loop per step, not one per request; an output the engine failed arrives as a
`RequestFailedError`; a closed event loop (its callers gone) is skipped, never an error.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.errors import RequestFailedError
from engine.outputs import RequestOutput

Item = RequestOutput | BaseException  # what a stream's queue carries


@dataclass
class RequestStream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items, or an exception to raise
    finished: bool = False


class RequestStreams:
    def __init__(self) -> None:
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str, loop: asyncio.AbstractEventLoop) -> RequestStream:
        """A new stream on ``loop``; ValueError if ``request_id`` already has one."""
        stream = RequestStream(loop=loop, queue=asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in flight")
            self._streams[request_id] = stream
        return stream

    def close(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def get(self, request_id: str) -> RequestStream | None:
        with self._lock:
            return self._streams.get(request_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def deliver(self, outputs: Iterable[RequestOutput]) -> None:
        """Hands a step's outputs to their streams (outputs of closed streams are dropped)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Item]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    item = out if out.error is None else RequestFailedError(out.error)
                    by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: its callers are gone
                pass

    def fail_all(self, error: BaseException) -> None:
        """Puts ``error`` in every open stream."""
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
            except RuntimeError:
                pass


def resolve(future: asyncio.Future, value: Any) -> None:
    """Sets ``future``'s result unless it is done (run it on the future's loop)."""
    if not future.done():
        future.set_result(value)


def _put_all(items: list[tuple[asyncio.Queue, Item]]) -> None:
    for q, out in items:
        q.put_nowait(out)
