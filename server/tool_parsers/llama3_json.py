"""Llama 3.x JSON style: the whole answer is `{"name": ..., "parameters": {...}}` (optionally
after `<|python_tag|>`; several calls separated by `;`). An answer that starts otherwise is
content."""
from __future__ import annotations

from server.tool_parsers.base import ParsedOutput, finish, scan_sequence
from server.tool_parsers.json_scan import skip_ws

TAG = "<|python_tag|>"


class Llama3JsonToolParser:
    name = "llama3_json"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        i = skip_ws(text, 0)
        if text.startswith(TAG, i):
            i = skip_ws(text, i + len(TAG))
        elif not final and TAG.startswith(text[i:]):
            return ParsedOutput("")  # may still become the tag
        if i >= len(text):
            return ParsedOutput(text if final else "")
        if text[i] != "{":
            return ParsedOutput(text if final else text.rstrip())
        calls, ok, _ = scan_sequence(text, i, ";", None)
        return finish(text, "", calls, final, ok)
