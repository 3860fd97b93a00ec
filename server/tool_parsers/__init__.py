"""Tool-call parsers: small plug-ins, one file each, chosen by `--tool-call-parser NAME` or,
by default, from the model's chat template (`default_parser_name`).

A parser has `name` and `parse(text, final) -> ParsedOutput` (server/tool_parsers/base.py
states the guarantees that make streaming exact); `ToolCallStreamer`
(server/tool_parsers/streaming.py) turns successive parses into OpenAI `delta.tool_calls`.
To add one: write a class with those two members and add it to `PARSERS`.
"""
from __future__ import annotations

from server.tool_parsers.base import ParsedOutput, ToolCall
from server.tool_parsers.hermes import HermesToolParser
from server.tool_parsers.json_array import JsonArrayToolParser, NamedFunctionParser
from server.tool_parsers.llama3_json import Llama3JsonToolParser
from server.tool_parsers.mistral import MistralToolParser

PARSERS = {p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, JsonArrayToolParser)}
PARSERS["qwen"] = HermesToolParser  # Qwen 2.5 / 3 use the Hermes format


def make_parser(name: str):
    """A parser by name; ValueError listing the known names otherwise."""
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(PARSERS))}")
    return PARSERS[name]()


def default_parser_name(chat_template: str | None) -> str:
    """The parser a chat template implies: Mistral's `[TOOL_CALLS]`, Llama 3's `<|python_tag|>`
    / `ipython` role, else Hermes (`<tool_call>`, also what Qwen and most fine-tunes use)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3_json"
    return "hermes"


__all__ = ["PARSERS", "ParsedOutput", "ToolCall", "NamedFunctionParser", "default_parser_name", "make_parser"]
