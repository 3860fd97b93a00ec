"""The generation endpoints (`/v1/completions`, `/v1/chat/completions`): validate, check token
limits, admit, run on the engine, and answer as JSON or as an SSE stream.

Streams wait for the request's first output before sending headers, so every error that can
happen before generation starts (validation, overload, engine down) still gets a proper HTTP
status; only errors after that go in-band. A client that disconnects, at any point, has its
request aborted at once; a request past its `timeout` is aborted too.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.errors import APIError, bad_request, internal_error, param_from_message
from server.formatting import Formatter, usage
from server.limits import Admission, Ticket, resolve_max_tokens
from server.metrics import ServerMetrics
from server.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from server.recorded import RecordedResponse
from server.request_hooks import Finisher, RequestHooks
from server.settings import ServerSettings
from server.sse import DONE, SSEResponse, sse_event

logger = logging.getLogger("conveyor.server")
_PARAM_NAMES = ("n", "max_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
                "presence_penalty", "frequency_penalty", "repetition_penalty", "stop",
                "stop_token_ids", "min_tokens", "logprobs", "prompt", "priority")


class ClientGone(Exception):
    """The client disconnected before the response started."""


def request_logger(request: Request) -> logging.LoggerAdapter:
    """A logger whose every line names the request's X-Request-Id."""
    return RequestLog(logger, request.scope.get("state", {}).get("request_id", "-"))


class RequestLog(logging.LoggerAdapter):
    def __init__(self, log: logging.Logger, rid: str) -> None:
        super().__init__(log, {"request_id": rid})

    def process(self, msg: Any, kwargs: Any) -> tuple[str, Any]:
        return f"[request_id={self.extra['request_id']}] {msg}", kwargs


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past `limit` bytes (checked while reading), 400 if malformed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON ({_json_reason(exc)}).",
                          code="invalid_json") from None


def _json_reason(exc: Exception) -> str:
    return exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Runs `work`; if the client disconnects first, cancels it and raises ClientGone."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - we only need it finished
                pass
            raise ClientGone()
    return task.result()


@dataclass
class Prepared:
    """A validated request ready for the engine."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams


@dataclass
class _Tracker:
    """Per-request bookkeeping for metrics and the waiting budget."""

    metrics: ServerMetrics
    ticket: Ticket
    last: RequestOutput | None = None
    last_time: float | None = None
    last_tokens: int = 0
    reasons: list[str] = field(default_factory=list)

    def seen(self, out: RequestOutput) -> None:
        self.ticket.release()  # producing output: no longer waiting
        self.last = out
        now = time.monotonic()
        tokens = sum(len(c.token_ids) for c in out.outputs)
        if tokens > self.last_tokens:
            if self.last_time is not None:
                self.metrics.observe_token_gap((now - self.last_time) / (tokens - self.last_tokens))
            self.last_time, self.last_tokens = now, tokens
        if out.finished:
            self.metrics.observe_finished(out, out.outputs[0].finish_reason or "abort")


@dataclass
class GenerationService:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics
    admission: Admission
    _background: set = field(default_factory=set)  # finishing tasks of aborted streams

    def served_name(self) -> str:
        """The model name clients use: --served-model-name, else the model's file or folder
        name (the engine's name may be a full path, which would leak into every response)."""
        if self.settings.served_model_name:
            return self.settings.served_model_name
        if self.engine.engine is None:
            return "unknown"  # still loading
        name = Path(str(self.engine.model_name).rstrip("/")).name
        return name[: -len(".gguf")] if name.endswith(".gguf") else name

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.served_name(), self.engine.model_name):
            raise APIError(404, f"The model `{model}` does not exist.", param="model",
                           code="model_not_found")

    async def handle(self, request: Request, chat: bool) -> Response:
        body = await read_json(request, self.settings.max_body_bytes)
        req = parse_request(body, chat)
        self.require_ready()
        self.check_model(req.model)
        return await self.execute(request, req, chat, self.prepare(req, chat), RequestHooks())

    def require_ready(self) -> None:
        if not self.engine.is_ready:
            raise APIError(503, "The engine is not ready.", code="engine_not_ready",
                           retry_after=self.settings.retry_after_seconds)

    def prepare(self, req: GenerationRequest, chat: bool) -> Prepared:
        """Tokenizes and checks the request against the limits (APIError 400 if it cannot run)."""
        prompt_ids = self.prompt_ids(req)
        max_tokens = resolve_max_tokens(len(prompt_ids), req.max_tokens, self.engine.max_model_len,
                                        self.settings, chat)
        try:
            params = SamplingParams(max_tokens=max_tokens, logprobs=req.logprobs, **req.sampling)
        except ValueError as exc:
            raise bad_request(str(exc), param_from_message(str(exc), _PARAM_NAMES)) from None
        return Prepared(prompt_ids, max_tokens, params)

    async def execute(self, request: Request, req: GenerationRequest, chat: bool, prep: Prepared,
                      hooks: RequestHooks) -> Response:
        """Admits and runs a prepared request, answering JSON or SSE."""
        log = request_logger(request)
        prompt_ids, max_tokens, params = prep.prompt_ids, prep.max_tokens, prep.params
        try:
            ticket = self.admission.admit(len(prompt_ids))
        except APIError:
            self.metrics.rejected.labels("queue_full").inc()
            raise
        rid = request.scope["state"]["request_id"]
        prefix = "chatcmpl" if chat else "cmpl"
        fmt = Formatter(chat=chat, response_id=f"{prefix}-{rid}", model=hooks.model_name or self.served_name(),
                        created=int(time.time()), tokenizer=self.engine.tokenizer,
                        logprobs=req.logprobs, include_usage=req.include_usage)
        engine_id = f"{prefix}-{rid}-{uuid.uuid4().hex[:8]}"  # unique even if a client reuses ids
        log.info("%s: %d prompt tokens, max_tokens=%d, n=%d, stream=%s", prefix, len(prompt_ids),
                 max_tokens, params.n, req.stream)
        stream = self.engine.generate(
            prompt_ids, params, engine_id, cache_salt=hooks.cache_salt,
            priority=req.priority if hooks.priority is None else hooks.priority,
            tenant=hooks.tenant or req.user)
        if hooks.wrap_stream is not None:
            stream = hooks.wrap_stream(stream)
        deadline = None if req.timeout is None else asyncio.get_running_loop().time() + req.timeout
        tracker = _Tracker(self.metrics, ticket)
        finish = Finisher(hooks, lambda: tracker.last)
        handed_off = False  # once the SSE body owns the stream, it closes it
        try:
            if req.stream:
                first = await until_disconnect(request, _next(stream, deadline, tracker))
                handed_off = True
                headers = {**_headers(first), **hooks.headers}
                return SSEResponse(self._stream_body(first, stream, deadline, tracker, fmt, log, finish,
                                                     headers), headers=headers)
            final = await until_disconnect(request, _last(stream, deadline, tracker))
            log.info("finished: %s", [c.finish_reason for c in final.outputs])
            body = fmt.response(final)
            headers = {**_headers(final, generated=True), **hooks.headers,
                       **(hooks.final_headers(final) if hooks.final_headers else {})}
            await finish(RecordedResponse(200, headers, body=body, usage=usage(final)))
            return JSONResponse(body, headers=headers)
        except ClientGone:
            log.info("client disconnected; request aborted")
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - mapped to a clean API error
            raise _as_api_error(exc, req.timeout, log) from None
        finally:
            ticket.release()
            if not handed_off:
                await stream.aclose()
                await finish(None)

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        tok = self.engine.tokenizer
        if isinstance(req, ChatCompletionRequest):
            try:
                text = tok.apply_chat_template(req.messages, tokenize=False,
                                               add_generation_prompt=req.add_generation_prompt)
            except Exception as exc:  # noqa: BLE001 - template errors are the messages' fault
                raise bad_request(f"messages could not be formatted with the chat template: "
                                  f"{str(exc)[:200]}", "messages") from None
            return tok.encode(text, add_special_tokens=False)
        if isinstance(req.prompt, str):
            return tok.encode(req.prompt)
        return list(req.prompt)

    async def _stream_body(self, first: RequestOutput, stream: AsyncIterator[RequestOutput],
                           deadline: float | None, tracker: _Tracker, fmt: Formatter,
                           log: logging.LoggerAdapter, finish: Finisher,
                           headers: dict[str, str]) -> AsyncIterator[str]:
        out = first
        events: list[str] = []  # kept for replays (idempotency, cache) when someone listens
        completed = False
        try:
            while True:
                for chunk in fmt.chunks(out):
                    event = sse_event(chunk)
                    if finish.listening:
                        events.append(event)
                    yield event
                if out.finished:
                    break
                out = await _next(stream, deadline, tracker)
            if fmt.include_usage:
                events.append(sse_event(fmt.usage_chunk(out)))
                yield events[-1]
            log.info("stream finished: %s", [c.finish_reason for c in out.outputs])
            completed = True
        except Exception as exc:  # noqa: BLE001 - after headers, errors go in-band
            yield _as_api_error(exc, None, log).to_sse()
        finally:
            await stream.aclose()
            if not completed and not finish.called:
                # the client left (or it failed): settle in the background, since awaiting
                # here may run inside a cancelled scope
                task = asyncio.ensure_future(finish(None))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        if completed:
            await finish(RecordedResponse(200, headers, events=[*events, DONE], usage=usage(out)))
        yield DONE


def parse_request(body: Any, chat: bool) -> GenerationRequest:
    return (ChatCompletionRequest if chat else CompletionRequest).from_json(body)


async def _next(stream: AsyncIterator[RequestOutput], deadline: float | None,
                tracker: _Tracker) -> RequestOutput:
    if deadline is None:
        out = await anext(stream)
    else:
        async with asyncio.timeout_at(deadline):
            out = await anext(stream)
    tracker.seen(out)
    return out


async def _last(stream: AsyncIterator[RequestOutput], deadline: float | None,
                tracker: _Tracker) -> RequestOutput:
    while True:
        out = await _next(stream, deadline, tracker)
        if out.finished:
            return out


def _headers(out: RequestOutput, generated: bool = False) -> dict[str, str]:
    h = {"X-Conveyor-Prompt-Tokens": str(len(out.prompt_token_ids))}
    if generated:
        h["X-Conveyor-Generated-Tokens"] = str(sum(len(c.token_ids) for c in out.outputs))
    if out.metrics.queue_time is not None:
        h["X-Conveyor-Queue-Time"] = f"{out.metrics.queue_time:.6f}"
    if out.metrics.time_to_first_token is not None:
        h["X-Conveyor-Time-To-First-Token"] = f"{out.metrics.time_to_first_token:.6f}"
    return h


def _as_api_error(exc: Exception, timeout: float | None, log: logging.LoggerAdapter) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TimeoutError):
        log.info("timed out after %ss; request aborted", timeout)
        return APIError(408, f"The request did not finish within its timeout of {timeout} seconds.",
                        param="timeout", code="timeout")
    if isinstance(exc, ValueError):
        return bad_request(str(exc), param_from_message(str(exc), _PARAM_NAMES))
    if isinstance(exc, EngineDeadError):
        log.error("engine unavailable: %s", exc)
        return APIError(503, "The engine is unavailable.", code="engine_unavailable")
    log.exception("unexpected error")
    return internal_error()
