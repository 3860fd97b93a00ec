"""An asyncio front for `LLMEngine`: the engine's step loop runs on its own thread, callers
await per-request streams of outputs.

Guarantees:
- The model never runs on the event loop: `LLMEngine` is built and stepped only on the engine
  thread, so HTTP handling never blocks on a forward pass.
- Requests and aborts are handed to the engine thread through a thread-safe queue and applied
  between steps; outputs come back with `loop.call_soon_threadsafe` into per-request queues.
- Leaving `generate` early (break, cancellation, client disconnect) aborts the request, which
  frees its KV blocks before the engine's next step.
- A request the engine fails (its step raised; see engine/step_failure.py) raises
  `RequestFailedError` in that request's stream only; the engine keeps serving. An unexpected
  exception while adding or aborting a request, or in an `on_step` observer, is logged and
  never stops the engine thread.
- If the engine cannot continue (`step()` raised: `EngineFatalError`, or any error outside the
  per-step recovery), the engine is dead: `errored` is set, `is_ready` turns False (the
  server's /health reports it), and every pending and future request fails with
  `EngineDeadError`.
- `progress()` says when a step last completed and whether work is pending (engine/progress.py),
  so the server's /health can report an engine that is alive but wedged.

The commands callers queue for the engine thread are in engine/async_commands.py, the
per-request output streams in engine/request_streams.py.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from engine.async_commands import AbortRequest, AddRequest, Command, CommandQueue, EngineCall, apply
from engine.config import EngineConfig
from engine.errors import EngineDeadError, RequestFailedError  # re-exported: callers import them from here
from engine.outputs import EngineStats, RequestOutput
from engine.progress import ProgressSnapshot, StepProgress
from engine.request_streams import RequestStreams, resolve

__all__ = ["AsyncEngine", "EngineDeadError", "RequestFailedError", "StepInfo"]
logger = logging.getLogger("conveyor.async_engine")


@dataclass
class StepInfo:
    """What one engine step did; handed to `on_step` observers on the engine thread."""

    duration: float
    num_outputs: int
    stats: EngineStats


class AsyncEngine:
    """Owns an `LLMEngine` running on a background thread. `engine_factory` builds the engine
    (on that thread); by default `LLMEngine(config)`. `on_step` observers run on the engine
    thread after every step and must be thread-safe (prometheus metrics are)."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        engine_factory: Callable[[], Any] | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
        idle_wait: float = 0.05,
    ) -> None:
        self.config = config or EngineConfig()
        self._factory = engine_factory or self._default_factory
        self.on_step = on_step  # settable later, e.g. by the server's metrics
        self._idle_wait = idle_wait
        self._commands = CommandQueue()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._streams = RequestStreams()
        self._stats = EngineStats()
        self._progress = StepProgress()
        self.engine: Any = None
        self.errored: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="conveyor-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, **kwargs: Any) -> "AsyncEngine":
        return cls(config, **kwargs)

    def _default_factory(self) -> Any:
        from engine.llm_engine import LLMEngine  # imported here: loading torch models is slow

        return LLMEngine(self.config)

    # ---- status -------------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        """True once the engine is built and its thread is alive and healthy."""
        return self._ready.is_set() and self.errored is None and self._thread.is_alive()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Blocks until the engine is built (or failed). Returns `is_ready`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.is_set() and self.errored is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._ready.wait(0.05 if left is None else min(0.05, left))
        return self.is_ready

    def get_stats(self) -> EngineStats:
        """The snapshot published after the latest step or command (safe from any thread)."""
        return self._stats

    def progress(self) -> ProgressSnapshot:
        """When a step last completed and whether work is pending (safe from any thread)."""
        return self._progress.snapshot()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- requests -----------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        params: Any,
        request_id: str,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        tenant: str | None = None,
        arrival_time: float | None = None,
        lora_request: Any = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative outputs as steps produce them, ending with the one
        whose `finished` is True. ``lora_request`` (a loaded `LoRARequest`) runs it with that
        adapter. Raises ValueError (before the first yield) when the engine rejects the request,
        RequestFailedError when the engine failed while running it,
        EngineDeadError when the engine thread has died."""
        if self.errored is not None:
            raise EngineDeadError("the engine stopped after an error")
        if not self._ready.is_set():
            raise EngineDeadError("the engine is not ready yet")
        loop = asyncio.get_running_loop()
        stream = self._streams.open(request_id, loop)
        accepted = loop.create_future()
        kwargs = {"priority": priority, "cache_salt": cache_salt, "tenant": tenant,
                  "arrival_time": time.time() if arrival_time is None else arrival_time}
        if lora_request is not None:
            kwargs["lora_request"] = lora_request
        self._submit(AddRequest(request_id, prompt, params, kwargs, accepted))
        if not self._thread.is_alive():  # it died between our check and the submit
            resolve(accepted, EngineDeadError("the engine stopped after an internal error"))
        try:
            error = await accepted
            if error is not None:
                stream.finished = True  # the engine never took it: nothing to abort
                raise error
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                if item.finished:
                    stream.finished = True
                yield item
                if stream.finished:
                    return
        finally:
            self._streams.close(request_id)
            if not stream.finished and self.errored is None:
                self._submit(AbortRequest(request_id))

    # ---- LoRA adapters ------------------------------------------------------------------
    async def add_lora(self, lora: Any) -> None:
        """Loads an adapter on the engine thread, between steps (`LLMEngine.add_lora`); raises
        its `LoRAError` (a ValueError naming the field) when the adapter is refused."""
        await self._call("add_lora", lora)

    async def remove_lora(self, lora_name: str) -> bool:
        """Unloads an adapter on the engine thread (`LLMEngine.remove_lora`); False if unknown."""
        return await self._call("remove_lora", lora_name)

    def list_loras(self) -> list:
        """The loaded adapters' `LoRARequest`s (a snapshot; safe from any thread)."""
        return [] if self.engine is None else self.engine.list_loras()

    async def _call(self, method: str, *args: Any) -> Any:
        if self.errored is not None:
            raise EngineDeadError("the engine stopped after an error")
        if not self._ready.is_set():
            raise EngineDeadError("the engine is not ready yet")
        done = asyncio.get_running_loop().create_future()
        self._submit(EngineCall(method, args, done))
        if not self._thread.is_alive():
            resolve(done, (None, EngineDeadError("the engine stopped after an internal error")))
        result, error = await done
        if error is not None:
            raise error
        return result

    def abort(self, request_id: str) -> None:
        """Aborts a request from any thread; a no-op for unknown or finished ones."""
        self._submit(AbortRequest(request_id))

    def _submit(self, command: Command) -> None:
        self._commands.put(command)
        if isinstance(command, AddRequest):  # after the put: see StepProgress.idle_if
            self._progress.work_arrived()
        self._wakeup.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the engine thread after its current step; pending requests get an error."""
        self._stop.set()
        self._wakeup.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._factory()
            self._publish_stats()
            self._ready.set()
            while not self._stop.is_set():
                self._apply_commands()
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self._progress.idle_if(self._commands.empty)
                    self._wakeup.wait(self._idle_wait)
                    self._wakeup.clear()
            self._fail_all(EngineDeadError("the engine was shut down"))
            close = getattr(self.engine, "close", None)  # tensor-parallel workers are told to exit
            if close is not None:
                close()
        except BaseException as exc:  # noqa: BLE001 - any death must reach the callers
            logger.exception("engine thread died")
            self.errored = exc
            self._fail_all(EngineDeadError("the engine stopped after an internal error"))

    def _apply_commands(self) -> None:
        changed = False
        for command in self._commands.take():
            changed = True
            apply(self.engine, command, self._streams)
        if changed:
            self._publish_stats()

    def _step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        duration = time.perf_counter() - start
        self._progress.step_completed()
        self._streams.deliver(outputs)  # one wake-up per event loop per step, not one per request
        stats = self._publish_stats()
        if self.on_step is not None:
            try:
                self.on_step(StepInfo(duration=duration, num_outputs=len(outputs), stats=stats))
            except Exception:  # noqa: BLE001 - an observer's bug must not stop the engine
                logger.exception("on_step observer failed")

    def _publish_stats(self) -> EngineStats:
        # A copy, so readers on other threads never see a half-updated object.
        self._stats = replace(self.engine.get_stats())
        return self._stats

    def _fail_all(self, error: BaseException) -> None:
        self._streams.fail_all(error)
        self._commands.fail_waiting(error)  # callers still waiting for their request to be accepted

