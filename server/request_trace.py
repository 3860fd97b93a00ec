"""What happened to one generation request, told once when it ends: its OpenTelemetry span
(when tracing is on) and its one summary log line (always).

`Gateway` makes one `RequestTrace` per request, marks the pipeline's phases on it (`phase`,
`event`), records the outcome (`failed`, `gone`, `out`) and calls `end()` however the request
ends; `end` is idempotent, so every exit path may call it. With tracing off `span` is None:
`phase` returns one shared no-op context and `event` returns at once, so no span object is
ever created. The span follows the OpenTelemetry GenAI semantic conventions (`gen_ai.*`
attributes) plus `conveyor.*` ones; the engine's phases (queue, prefill, decode) are child
spans built at the end from the request's engine timestamps (`RequestMetrics`), with a
`first_token` event. Nothing secret is logged or traced (no API key, no prompt or output
text) unless `log_prompts` is set.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from engine.outputs import RequestOutput
from server.trace_file import append_trace_line
from server.tracing import Tracing

summary_logger = logging.getLogger("conveyor.request")
_NO_PHASE = contextlib.nullcontext()


def _ns(t: float) -> int:
    return int(t * 1e9)


@dataclass(eq=False)
class RequestTrace:
    request_id: str
    operation: str  # GenAI operation name: "chat" | "text_completion"
    tracing: Tracing | None = None
    span: Any = None  # the request's span; None when tracing is off
    log_prompts: bool = False
    start: float = field(default_factory=time.time)
    tenant: str | None = None
    model: str | None = None  # the served name: a model's or a LoRA adapter's
    base_model: str | None = None  # the model whose engine ran it (a LoRA adapter's base)
    route: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    stream: bool = False
    status: int = 200
    error: str | None = None  # the error code (or type) of a refused or failed request
    client_gone: bool = False
    source: str = "engine"  # engine | response (cache) | dedup | replay
    out: RequestOutput | None = None  # the last engine output
    prompt: Any = None  # the prompt or messages, kept only with log_prompts
    answered: bool = False  # a recorded response (replay, cache or dedup hit) was served
    streaming: bool = False  # an engine stream is being sent: the pipeline's end ends the trace
    ended: bool = False
    priority: int | None = None  # the engine priority the request ran with (for the trace file)
    trace_file: str | None = None  # `--trace-file`: append this request's line there (server/trace_file.py)

    @classmethod
    def begin(cls, tracing: Tracing | None, request_id: str, chat: bool, headers: Any,
              log_prompts: bool = False) -> "RequestTrace":
        trace = cls(request_id, "chat" if chat else "text_completion", tracing, log_prompts=log_prompts)
        if tracing is not None:
            trace.span = tracing.begin(f"{trace.operation}", headers, _ns(trace.start))
            trace.span.set_attributes({"gen_ai.operation.name": trace.operation, "conveyor.request_id": request_id})
        return trace

    # ---- during the request ---------------------------------------------------------------
    def phase(self, name: str) -> Any:
        """A context manager timing one pipeline phase as a child span (no-op when off)."""
        if self.span is None:
            return _NO_PHASE
        return self._phase(name)

    @contextlib.contextmanager
    def _phase(self, name: str) -> Any:
        child = self.tracing.child(self.span, name)
        try:
            yield child
        except BaseException as exc:
            _set_error(child, type(exc).__name__, getattr(exc, "message", str(exc)))
            raise
        finally:
            child.end()

    def event(self, name: str, **attributes: Any) -> None:
        if self.span is not None:
            self.span.add_event(name, {k: v for k, v in attributes.items() if v is not None})

    def failed(self, status: int, code: str | None, message: str = "") -> None:
        """The request was refused or failed with HTTP `status` (the first failure wins)."""
        if self.error is None:
            self.status, self.error = status, code or "error"
            if self.span is not None:
                self.span.set_attribute("error.type", self.error)
                self.span.add_event("error", {"http.response.status_code": status, "message": message[:500]})

    def gone(self) -> None:
        """The client disconnected before the request finished (logged as HTTP 499)."""
        if self.error is None and not self.finished:
            self.client_gone, self.status, self.error = True, 499, "client_disconnected"

    @property
    def finished(self) -> bool:
        return self.answered or (self.out is not None and self.out.finished)

    # ---- the end --------------------------------------------------------------------------
    def end(self) -> None:
        """Ends the span and writes the summary line, once."""
        if self.ended:
            return
        self.ended = True
        now = time.time()
        if self.trace_file is not None:
            append_trace_line(self.trace_file, self, now)
        logged = summary_logger.isEnabledFor(logging.INFO)
        if self.span is None and not logged:
            return
        fields = self.summary(now)
        if self.span is not None:
            self._end_span(fields, now)
        if logged:  # the text form is built only if a handler formats the message (JSON does not use it)
            summary_logger.info("[request_id=%s] summary: %s", self.request_id, _Fields(fields),
                                extra={"request_id": self.request_id, "tenant": self.tenant, "model": self.model,
                                       "event": "request_summary", "fields": fields})

    def summary(self, now: float) -> dict[str, Any]:
        out = self.out
        reasons = [c.finish_reason for c in out.outputs] if out is not None else []
        m = out.metrics if out is not None else None
        fields: dict[str, Any] = {
            "status": self.status,
            "finish_reason": ",".join(r or "abort" for r in reasons) or None,
            "error": self.error,
            "prompt_tokens": len(out.prompt_token_ids) if out is not None else 0,
            "cached_tokens": out.num_cached_tokens if out is not None else 0,
            "completion_tokens": sum(len(c.token_ids) for c in out.outputs) if out is not None else 0,
            "ttft_s": round(m.time_to_first_token, 6) if m is not None and m.time_to_first_token is not None
            else None,
            "total_s": round(now - self.start, 6),
            "preemptions": out.num_preemptions if out is not None else 0,
            "client_disconnected": self.client_gone,
            "stream": self.stream,
            "route": self.route,
            "source": self.source,
        }
        if self.log_prompts:
            fields["prompt"] = self.prompt
            fields["completion"] = [c.text for c in out.outputs] if out is not None else None
        return fields

    def _end_span(self, fields: dict[str, Any], now: float) -> None:
        span, out = self.span, self.out
        attrs = {"gen_ai.request.model": self.model, "gen_ai.request.max_tokens": self.max_tokens,
                 "gen_ai.request.temperature": self.temperature, "conveyor.tenant": self.tenant,
                 "conveyor.route": self.route, "conveyor.stream": self.stream, "conveyor.source": self.source,
                 "conveyor.client_disconnected": self.client_gone, "http.response.status_code": self.status}
        if out is not None:
            attrs.update({
                "gen_ai.response.id": f"{'chatcmpl' if self.operation == 'chat' else 'cmpl'}-{self.request_id}",
                "gen_ai.response.model": self.model,
                "gen_ai.usage.input_tokens": fields["prompt_tokens"],
                "gen_ai.usage.output_tokens": fields["completion_tokens"],
                "gen_ai.response.finish_reasons": [c.finish_reason or "abort" for c in out.outputs],
                "conveyor.cached_tokens": fields["cached_tokens"],
                "conveyor.preemptions": fields["preemptions"]})
            self._engine_phases(out, now)
        span.set_attributes({k: v for k, v in attrs.items() if v is not None})
        if self.error is not None:
            _set_error(span, self.error, f"HTTP {self.status}: {self.error}")
        span.end(end_time=_ns(now))

    def _engine_phases(self, out: RequestOutput, now: float) -> None:
        """Queue, prefill and decode as child spans, from the engine's own timestamps."""
        m = out.metrics
        end = m.finished_time or now
        scheduled, first = m.first_scheduled_time, m.first_token_time

        def child(name: str, start: float, stop: float, events: list = (), **attrs: Any) -> None:
            s = self.tracing.child(self.span, name, _ns(start))
            s.set_attributes(attrs)
            for event, at, event_attrs in events:
                s.add_event(event, event_attrs, timestamp=_ns(at))
            s.end(end_time=_ns(max(start, stop)))

        child("queue", m.arrival_time, scheduled or end)
        if scheduled is not None:
            # one event per prompt chunk: several under chunked prefill
            chunks = [("prefill_chunk", at, {"conveyor.chunk_tokens": n}) for at, n in m.prefill_chunks]
            child("prefill", scheduled, first or end, events=chunks, **{
                "conveyor.prefill_tokens": max(0, len(out.prompt_token_ids) - out.num_cached_tokens),
                "conveyor.cached_tokens": out.num_cached_tokens})
        if first is not None:
            self.span.add_event("first_token", timestamp=_ns(first))
            child("decode", first, end, **{
                "gen_ai.usage.output_tokens": sum(len(c.token_ids) for c in out.outputs)})


class _Fields:
    """The summary's `key=value` text, built when a formatter asks for the message."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{k}={_text(v)}" for k, v in self.fields.items())


def _set_error(span: Any, kind: str, description: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, description))
    span.set_attribute("error.type", kind)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, dict)) or (isinstance(value, str) and not value.isprintable() or " " in str(value)):
        return json.dumps(value, ensure_ascii=False)
    return "-" if value is None else str(value)
