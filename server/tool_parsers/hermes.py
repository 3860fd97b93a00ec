"""Hermes / Qwen style: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block
per call; text before the first block is content, text between or after blocks is ignored."""
from __future__ import annotations

from server.tool_parsers.base import ParsedOutput, before_marker, call_from_object, finish
from server.tool_parsers.json_scan import skip_ws

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser:
    name = "hermes"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(START)
        if first < 0:
            return before_marker(text, START, final)
        calls, i = [], first
        while i >= 0:
            call, obj = call_from_object(text, skip_ws(text, i + len(START)))
            if obj.error:
                return finish(text, "", calls, final, ok=False)
            if call is not None:
                calls.append(call)
            if obj.end is None:
                break
            i = text.find(START, obj.end)
        return finish(text, text[:first].rstrip(), calls, final)
