"""One served model's share of a generation request: tokenize, check the request against the
model's context and the server's caps, run it on the model's engine under the waiting budget,
and count it in the model's metrics. The request's path through the server (auth, limits,
caches, settlement) is server/gateway.py; this file knows nothing about tenants.

Guarantees of `ModelService.generate`: the request holds a place in the waiting budget
(`Admission`) until its first output or its end; the engine request is aborted as soon as
the output stream is closed early; every request that reached the engine is counted once in
`vllm:request_success`, with `finished_reason="abort"` when it ended before finishing (the
client left, it timed out, the server stopped it).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request

from engine.async_engine import AsyncEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.errors import APIError, bad_request, param_from_message
from server.json_body import parse_json_body
from server.formatting import Formatter
from server.limits import Admission, resolve_max_tokens
from server.metrics import ABORT, ModelMetrics
from server.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from server.settings import ServerSettings
from server.tool_parsers import default_parser_name

logger = logging.getLogger("conveyor.server")
PARAM_NAMES = ("n", "max_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
               "presence_penalty", "frequency_penalty", "repetition_penalty", "stop",
               "stop_token_ids", "min_tokens", "logprobs", "prompt", "priority")
OutputFilter = Callable[[AsyncIterator[RequestOutput]], AsyncIterator[RequestOutput]]


class ClientGone(Exception):
    """The client disconnected before the response started."""


def request_logger(request: Request) -> logging.LoggerAdapter:
    """A logger whose every line names the request's X-Request-Id."""
    return RequestLog(logger, request.scope.get("state", {}).get("request_id", "-"))


class RequestLog(logging.LoggerAdapter):
    def __init__(self, log: logging.Logger, rid: str) -> None:
        super().__init__(log, {"request_id": rid})

    def process(self, msg: Any, kwargs: Any) -> tuple[str, Any]:
        # the fields (request id, then tenant and model once known) also go on the record, for JSON logs
        kwargs["extra"] = {**self.extra, **kwargs.get("extra", {})}
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
    return parse_json_body(b"".join(chunks))  # 400 naming what is wrong (server/json_body.py)


def parse_request(body: Any, chat: bool) -> GenerationRequest:
    return (ChatCompletionRequest if chat else CompletionRequest).from_json(body)


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
class ModelService:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: ModelMetrics
    admission: Admission  # shared by every model of the server
    lora_metrics: Any = None  # server.lora_metrics.LoRAMetrics when LoRA is enabled on this model

    def served_name(self) -> str:
        """The model name clients use: --served-model-name, else the model's file or folder
        name (the engine's name may be a full path, which would leak into every response)."""
        if self.settings.served_model_name:
            return self.settings.served_model_name
        if self.engine.engine is None:
            return "unknown"  # still loading
        name = Path(str(self.engine.model_name).rstrip("/")).name
        return name[: -len(".gguf")] if name.endswith(".gguf") else name

    def require_ready(self) -> None:
        """503 with Retry-After unless the engine can take requests."""
        if not self.engine.is_ready:
            raise APIError(503, "The engine is not ready." if self.engine.errored is None else
                           "The engine stopped after an error.", code="engine_not_ready",
                           retry_after=self.settings.retry_after_seconds)

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        tok = self.engine.tokenizer
        if isinstance(req, ChatCompletionRequest):
            try:
                tools = req.tools.tools if req.tools is not None else None  # the template renders them
                text = tok.apply_chat_template(req.messages, tools=tools, tokenize=False,
                                               add_generation_prompt=req.add_generation_prompt)
            except Exception as exc:  # noqa: BLE001 - template errors are the messages' fault
                raise bad_request(f"messages could not be formatted with the chat template: "
                                  f"{str(exc)[:200]}", "messages") from None
            return tok.encode(text, add_special_tokens=False)
        if isinstance(req.prompt, str):
            return tok.encode(req.prompt)
        return list(req.prompt)

    def prepare(self, req: GenerationRequest, prompt_ids: list[int]) -> Prepared:
        """Checks the request against the limits (APIError 400 if it cannot run)."""
        chat = isinstance(req, ChatCompletionRequest)
        max_tokens = resolve_max_tokens(len(prompt_ids), req.max_tokens, self.engine.max_model_len,
                                        self.settings, chat)
        try:
            params = SamplingParams(max_tokens=max_tokens, logprobs=req.logprobs, **req.sampling)
        except ValueError as exc:
            raise bad_request(str(exc), param_from_message(str(exc), PARAM_NAMES)) from None
        return Prepared(prompt_ids, max_tokens, params)

    def formatter(self, req: GenerationRequest, response_id: str, model: str) -> Formatter:
        return Formatter(chat=isinstance(req, ChatCompletionRequest), response_id=response_id,
                         model=model, created=int(time.time()), tokenizer=self.engine.tokenizer,
                         logprobs=req.logprobs, include_usage=req.include_usage,
                         tool_parser=self._tool_parser_factory(req))

    def _tool_parser_factory(self, req: GenerationRequest) -> Callable[[], Any] | None:
        """Makes one tool-call parser per choice (None: the output is plain content)."""
        tools = getattr(req, "tools", None)
        if tools is None or tools.choice == "none":
            return None
        name = self.settings.tool_call_parser or default_parser_name(
            getattr(self.engine.tokenizer, "chat_template", None))
        return lambda: tools.parser(name)

    async def generate(self, prep: Prepared, request_id: str, *, cache_salt: str | None,
                       priority: int, tenant: str | None, lora_request: Any = None,
                       output_filter: OutputFilter | None = None) -> AsyncIterator[RequestOutput]:
        """The request's cumulative outputs, passed through `output_filter` (the tenant's
        output guards) when given; `lora_request` (a LoRARequest) runs it on that adapter. Raises APIError 503 when the waiting budget is full,
        ValueError when the engine refuses the request, EngineDeadError when it died."""
        structured = getattr(self.engine.engine, "structured", None)
        if structured is not None and prep.params.structured_outputs is not None:
            # compile off the event loop and the step loop; a constraint that fails is a 400 now
            await asyncio.wrap_future(structured.submit(prep.params.structured_outputs))
        try:
            ticket = self.admission.admit(len(prep.prompt_ids))
        except APIError:
            self.metrics.rejected("queue_full")
            raise
        lora = {"lora_request": lora_request} if lora_request is not None else {}
        outputs = self.engine.generate(prep.prompt_ids, prep.params, request_id, cache_salt=cache_salt,
                                       priority=priority, tenant=tenant, **lora)
        if output_filter is not None:
            outputs = output_filter(outputs)
        last: RequestOutput | None = None
        refused = False
        last_time, last_tokens = None, 0
        try:
            async for out in outputs:
                ticket.release()  # producing output: no longer waiting
                now = time.monotonic()
                tokens = sum(len(c.token_ids) for c in out.outputs)
                if tokens > last_tokens:
                    if last_time is not None:
                        self.metrics.observe_token_gap((now - last_time) / (tokens - last_tokens))
                    last_time, last_tokens = now, tokens
                last = out
                if out.finished:
                    self._finished(out, out.outputs[0].finish_reason or ABORT, lora_request)
                yield out
                if out.finished:
                    return
        except ValueError:
            refused = last is None  # the engine never took it: not a finished request
            raise
        finally:
            ticket.release()
            await outputs.aclose()  # aborts the engine request if it is still running
            if not refused and (last is None or not last.finished):
                self._finished(last, ABORT, lora_request)

    def _finished(self, out: RequestOutput | None, reason: str, lora_request: Any) -> None:
        self.metrics.observe_finished(out, reason)
        if lora_request is not None and self.lora_metrics is not None:
            self.lora_metrics.observe_finished(self.served_name(), lora_request.lora_name, out, reason)


def output_headers(out: RequestOutput, generated: bool = False) -> dict[str, str]:
    """`X-Conveyor-*` token counts and timings of a generation response."""
    h = {"X-Conveyor-Prompt-Tokens": str(len(out.prompt_token_ids))}
    if generated:
        h["X-Conveyor-Generated-Tokens"] = str(sum(len(c.token_ids) for c in out.outputs))
    if out.metrics.queue_time is not None:
        h["X-Conveyor-Queue-Time"] = f"{out.metrics.queue_time:.6f}"
    if out.metrics.time_to_first_token is not None:
        h["X-Conveyor-Time-To-First-Token"] = f"{out.metrics.time_to_first_token:.6f}"
    return h
