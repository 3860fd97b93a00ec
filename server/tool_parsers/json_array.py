"""The form `tool_choice: "required"` forces through structured outputs: a JSON array
`[{"name": ..., "parameters": {...}}, ...]` (server/tool_request.py builds its schema)."""
from __future__ import annotations

from server.tool_parsers.base import ParsedOutput, finish, scan_sequence
from server.tool_parsers.json_scan import skip_ws


class JsonArrayToolParser:
    name = "json_array"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        i = skip_ws(text, 0)
        if i >= len(text):
            return ParsedOutput(text if final else "")
        if text[i] != "[":
            return ParsedOutput(text if final else text.rstrip())
        calls, ok, _ = scan_sequence(text, i + 1, ",", "]")
        return finish(text, "", calls, final, ok)


class NamedFunctionParser:
    """`tool_choice: {"type": "function", "function": {"name": N}}`: the constrained output is
    the arguments object itself; the call's name is known from the start."""

    name = "named_function"

    def __init__(self, function: str):
        self.function = function

    def parse(self, text: str, final: bool) -> ParsedOutput:
        from server.tool_parsers.base import ToolCall  # noqa: PLC0415

        start = len(text) - len(text.lstrip())
        return finish(text, "", [ToolCall(self.function, text[start:], final)], final)
