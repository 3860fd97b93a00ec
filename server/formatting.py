"""Engine outputs -> OpenAI response bodies and stream chunks (completions and chat).

The engine's outputs are cumulative; `Formatter` remembers, per choice, how much text and how
many tokens it already sent, so each chunk carries only the increment. With a tool-call parser
(chat requests with tools), each choice's text goes through it: `message.tool_calls` and
`finish_reason: "tool_calls"` when it found calls, and streamed `delta.tool_calls` that
concatenate to exactly those (server/tool_parsers/streaming.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.outputs import CompletionOutput, RequestOutput
from server.tool_parsers.streaming import ToolCallStreamer, new_call_id


@dataclass
class _Sent:
    text: int = 0  # characters already sent
    tokens: int = 0  # tokens already sent (for logprobs)
    offset: int = 0  # text_offset of the next token (legacy completion logprobs)
    started: bool = False  # chat: the role delta went out
    finished: bool = False
    tools: ToolCallStreamer | None = None  # chat with a tool-call parser


def _tool_finish(reason: str | None) -> str | None:
    """A choice that ended normally with tool calls finished to call them."""
    return "tool_calls" if reason == "stop" else reason


def usage(out: RequestOutput) -> dict[str, Any]:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


@dataclass
class Formatter:
    chat: bool
    response_id: str
    model: str
    created: int
    tokenizer: Any
    logprobs: int | None  # top-n; None = no logprobs
    include_usage: bool = False
    tool_parser: Callable[[], Any] | None = None  # makes one tool-call parser per choice
    _sent: dict[int, _Sent] = field(default_factory=dict)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    # ---- whole responses ----------------------------------------------------------------
    def response(self, out: RequestOutput) -> dict[str, Any]:
        choices = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            choice: dict[str, Any] = {"index": c.index}
            finish_reason = c.finish_reason
            if self.chat and self.tool_parser is not None:
                parsed = self.tool_parser().parse(c.text, True)
                choice["message"] = {"role": "assistant", "content": parsed.content or None}
                if parsed.calls:
                    choice["message"]["tool_calls"] = [
                        {"id": new_call_id(), "type": "function",
                         "function": {"name": call.name, "arguments": call.arguments}} for call in parsed.calls]
                    finish_reason = _tool_finish(finish_reason)
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            choice["logprobs"] = self._logprobs(c, 0, len(c.token_ids), 0)
            choice["finish_reason"] = finish_reason
            choice["stop_reason"] = c.stop_reason
            choices.append(choice)
        return {"id": self.response_id, "object": self.object, "created": self.created,
                "model": self.model, "choices": choices, "usage": usage(out)}

    # ---- stream chunks ------------------------------------------------------------------
    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        """The chunks that bring the client from what it has to `out`."""
        result = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            sent = self._sent.setdefault(c.index, _Sent())
            if sent.finished:
                continue
            if self.chat and not sent.started:
                sent.started = True
                result.append(self._chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}))
            text = c.text[sent.text:]
            logprobs = self._logprobs(c, sent.tokens, len(c.token_ids), sent.offset)
            new_tokens = len(c.token_ids) - sent.tokens
            sent.text = len(c.text)
            sent.tokens = len(c.token_ids)
            if not text and not new_tokens and not c.finished:
                continue
            if logprobs is not None and not self.chat:
                sent.offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1]) \
                    if logprobs["tokens"] else sent.offset
            choice: dict[str, Any] = {"index": c.index}
            finish_reason = c.finish_reason
            if self.chat and self.tool_parser is not None:
                if sent.tools is None:
                    sent.tools = ToolCallStreamer(self.tool_parser())
                content, calls = sent.tools.update(c.text, c.finished)
                choice["delta"] = {"content": content} if content else {}
                if calls:
                    choice["delta"]["tool_calls"] = calls
                if not choice["delta"] and not c.finished and logprobs is None:
                    continue  # text held back (it may be the start of a tool call)
                if sent.tools.ids:
                    finish_reason = _tool_finish(finish_reason)
            elif self.chat:
                choice["delta"] = {"content": text} if text or not c.finished else {}
            else:
                choice["text"] = text
            choice["logprobs"] = logprobs
            choice["finish_reason"] = finish_reason
            if c.finished:
                choice["stop_reason"] = c.stop_reason
                sent.finished = True
            result.append(self._chunk(choice))
        return result

    def usage_chunk(self, out: RequestOutput) -> dict[str, Any]:
        chunk = self._chunk(None)
        chunk["choices"] = []
        chunk["usage"] = usage(out)
        return chunk

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        chunk = {"id": self.response_id, "object": f"{self.object}.chunk" if self.chat else self.object,
                 "created": self.created, "model": self.model,
                 "choices": [] if choice is None else [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    # ---- logprobs -----------------------------------------------------------------------
    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs(self, c: CompletionOutput, start: int, end: int, offset: int) -> dict | None:
        if self.logprobs is None or c.logprobs is None:
            return None
        entries = []
        for pos in range(start, min(end, len(c.logprobs))):
            token_id = c.token_ids[pos]
            table = c.logprobs[pos]
            chosen = table.get(token_id, -9999.0)  # always present per the engine contract; JSON has no -inf
            top = sorted(table.items(), key=lambda kv: kv[1], reverse=True)[: self.logprobs]
            entries.append((token_id, chosen, top))
        if self.chat:
            content = []
            for token_id, chosen, top in entries:
                s = self._token_str(token_id)
                content.append({"token": s, "logprob": chosen, "bytes": list(s.encode("utf-8")),
                                "top_logprobs": [{"token": (t := self._token_str(i)), "logprob": lp,
                                                  "bytes": list(t.encode("utf-8"))} for i, lp in top]})
            return {"content": content}
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for token_id, chosen, top in entries:
            s = self._token_str(token_id)
            tokens.append(s)
            token_logprobs.append(chosen)
            tops.append({self._token_str(i): lp for i, lp in top})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
                "text_offset": offsets}
