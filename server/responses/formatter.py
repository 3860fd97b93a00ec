"""Engine outputs -> a Responses API `response` object, or its typed stream events.

The stream is `response.created`, `response.in_progress`, then per output item
`response.output_item.added` and its content events (a message: `response.content_part.added`,
`response.output_text.delta`..., `response.output_text.done`, `response.content_part.done`; a
function call: `response.function_call_arguments.delta`..., `response.function_call_arguments.done`),
`response.output_item.done`, and finally `response.completed` (or `response.incomplete` when
`max_output_tokens` or a guardrail cut it short, `response.failed` otherwise). Every event
carries the next `sequence_number` (from 0) and goes out as `event: TYPE` + `data: JSON`.

Both paths run the same state machine (`_advance`), so the streamed items, their ids and their
concatenated deltas equal the items of the final `response` object exactly. With function
tools the text goes through the tool-call parser (server/tool_parsers/), whose successive
parses only ever extend each other: text before the first call is a message item, each call a
`function_call` item.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.outputs import CompletionOutput, RequestOutput

STATUS = {"stop": "completed", "length": "incomplete", "content_filter": "incomplete"}
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _Item:
    """One output item being built: a message (text) or a function call (arguments)."""

    kind: str  # "message" | "function_call"
    id: str
    text: str = ""  # message text, or the call's arguments
    name: str | None = None
    call_id: str | None = None
    done: bool = False

    def body(self) -> dict[str, Any]:
        status = "completed" if self.done else "in_progress"
        if self.kind == "message":
            content = [self.part()] if self.done or self.text else []
            return {"type": "message", "id": self.id, "status": status, "role": "assistant", "content": content}
        return {"type": "function_call", "id": self.id, "call_id": self.call_id, "name": self.name,
                "arguments": self.text, "status": status}

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}


@dataclass
class ResponsesFormatter:
    """`response(out)` for a JSON answer, `chunks(out)` for the stream (SSE strings); the
    gateway calls one of them with the engine's cumulative outputs. `tool_parser` makes the
    request's tool-call parser (None: the output is plain text)."""

    response_id: str
    model: str
    echo: dict[str, Any]
    tool_parser: Callable[[], Any] | None = None
    include_usage: bool = False  # the usage is in the final event, not a chunk of its own
    done: str = ""  # no `data: [DONE]`: the stream ends after its final event
    created_at: int = field(default_factory=lambda: int(time.time()))
    _items: list[_Item] = field(default_factory=list)
    _parser: Any = None
    _seq: int = 0
    _started: bool = False
    _finished: bool = False

    # ---- the two entry points ------------------------------------------------------------
    def response(self, out: RequestOutput) -> dict[str, Any]:
        self._advance(out.outputs[0], [])
        return self._object(out, out.outputs[0].finish_reason)

    def chunks(self, out: RequestOutput) -> list[str]:
        if self._finished:
            return []
        events: list[str] = []
        if not self._started:
            self._started = True
            for kind in ("response.created", "response.in_progress"):
                self._emit(events, kind, response=self._object(None, None))
        c = out.outputs[0]
        self._advance(c, events)
        if c.finished:
            self._finished = True
            status = STATUS.get(c.finish_reason or "", "failed")
            self._emit(events, f"response.{status}", response=self._object(out, c.finish_reason))
        return events

    # ---- the state machine ---------------------------------------------------------------
    def _advance(self, c: CompletionOutput, events: list[str]) -> None:
        """Brings the items up to `c`'s text, appending the events that say so."""
        content, calls = c.text, []
        if self.tool_parser is not None:
            if self._parser is None:
                self._parser = self.tool_parser()
            parsed = self._parser.parse(c.text, c.finished)
            content, calls = parsed.content, [call for call in parsed.calls if call.name is not None]
        message = self._items[0] if self._items and self._items[0].kind == "message" else None
        calls_seen = len(self._items) - (message is not None)
        if content and calls_seen == 0:  # text after the first call started stays out (as chat does)
            if message is None:
                message = self._open(events, _Item("message", _id("msg")))
            delta = content[len(message.text):]
            if delta:
                message.text = content
                self._emit(events, "response.output_text.delta", **self._where(message), delta=delta, logprobs=[])
        for index, call in enumerate(calls):
            if index >= calls_seen:
                self._close_last(events)
                self._open(events, _Item("function_call", _id("fc"), name=call.name, call_id=_id("call")))
            item = self._items[index + (message is not None)]
            delta = call.arguments[len(item.text):] if call.arguments.startswith(item.text) else ""
            if delta:
                item.text += delta
                self._emit(events, "response.function_call_arguments.delta", item_id=item.id,
                           output_index=self._items.index(item), delta=delta)
        if c.finished:
            if not self._items:  # an empty answer is still one (empty) message
                self._open(events, _Item("message", _id("msg")))
            self._close_last(events)

    def _open(self, events: list[str], item: _Item) -> _Item:
        self._items.append(item)
        self._emit(events, "response.output_item.added", output_index=len(self._items) - 1, item=item.body())
        if item.kind == "message":
            self._emit(events, "response.content_part.added", **self._where(item),
                       part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        return item

    def _close_last(self, events: list[str]) -> None:
        if not self._items or self._items[-1].done:
            return
        item = self._items[-1]
        item.done = True
        index = len(self._items) - 1
        if item.kind == "message":
            self._emit(events, "response.output_text.done", **self._where(item), text=item.text, logprobs=[])
            self._emit(events, "response.content_part.done", **self._where(item), part=item.part())
        else:
            self._emit(events, "response.function_call_arguments.done", item_id=item.id, output_index=index,
                       name=item.name, arguments=item.text)
        self._emit(events, "response.output_item.done", output_index=index, item=item.body())

    def _where(self, item: _Item) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": self._items.index(item), "content_index": 0}

    def _emit(self, events: list[str], kind: str, **payload: Any) -> None:
        data = {"type": kind, "sequence_number": self._seq, **payload}
        self._seq += 1
        events.append(f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n")

    # ---- the response object -------------------------------------------------------------
    def _object(self, out: RequestOutput | None, finish_reason: str | None) -> dict[str, Any]:
        e = self.echo
        status = "in_progress" if out is None else STATUS.get(finish_reason or "", "failed")
        usage = None
        if out is not None:
            prompt, completion = len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs)
            usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
                     "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": prompt + completion}
        return {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "error": {"code": "server_error", "message": "The request did not finish."} if status == "failed" else None,
            "incomplete_details": {"reason": INCOMPLETE[finish_reason]} if status == "incomplete" else None,
            "instructions": e.get("instructions"), "max_output_tokens": e.get("max_output_tokens"),
            "model": self.model, "output": [] if out is None else [item.body() for item in self._items],
            "parallel_tool_calls": e.get("parallel_tool_calls") is not False, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": e.get("temperature"), "top_p": e.get("top_p"),
            "text": {"format": e.get("text", {}).get("format") or {"type": "text"}},
            "tool_choice": e.get("tool_choice") or "auto", "tools": e.get("tools") or [], "truncation": "disabled",
            "usage": usage, "user": e.get("user"), "metadata": e.get("metadata") or {},
        }
