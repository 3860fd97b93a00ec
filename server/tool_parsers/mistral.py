"""Mistral style: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (a bare object after
the marker is accepted too); text before the marker is content."""
from __future__ import annotations

from server.tool_parsers.base import ParsedOutput, before_marker, finish, scan_sequence
from server.tool_parsers.json_scan import skip_ws

START = "[TOOL_CALLS]"


class MistralToolParser:
    name = "mistral"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(START)
        if first < 0:
            return before_marker(text, START, final)
        i = skip_ws(text, first + len(START))
        if i < len(text) and text[i] == "[":
            calls, ok, _ = scan_sequence(text, i + 1, ",", "]")
        else:
            calls, ok, _ = scan_sequence(text, i, ",", None)
        return finish(text, text[:first].rstrip(), calls, final, ok)
