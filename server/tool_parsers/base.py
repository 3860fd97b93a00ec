"""What every tool-call parser returns, and the shared machinery they are built on.

A parser turns the model's text into `content` plus `ToolCall`s. `parse(text, final)` is
called with the text so far while streaming (`final=False`) and once with the whole text
(`final=True`). Guarantees, for every parser and every prefix `p` of a text `t`:

* `parse(p).content` is a prefix of `parse(t).content`, and so is each call's `name`
  (a name is reported only once complete) and `arguments` (the model's own text of the
  arguments value, never re-serialized): so streamed deltas concatenate to exactly the
  non-streamed result, whatever the chunking (server/tool_parsers/streaming.py);
* `parse(t, final=True)` returns no calls at all, and the whole text as content, when any
  call is malformed (not JSON, no name, arguments not an object): unparseable output stays
  content, never an error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from server.tool_parsers.json_scan import ScannedObject, scan_object, skip_ws

ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class ToolCall:
    name: str | None  # None until the name is complete
    arguments: str  # raw JSON text of the arguments so far ("" before they start)
    complete: bool = False


@dataclass
class ParsedOutput:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


def call_from_object(text: str, start: int) -> tuple[ToolCall | None, ScannedObject]:
    """The call described by the `{"name": ..., "arguments": {...}}` object at `text[start]`
    (as far as it goes); None while not even its name is known or when it is malformed."""
    obj = scan_object(text, start)
    name_m = obj.get("name")
    if obj.error or name_m is None or name_m.end is None:
        return None, obj
    try:
        name = json.loads(text[name_m.start:name_m.end])
    except ValueError:
        return None, obj
    if not isinstance(name, str):
        return None, obj
    args_m = next((obj.get(k) for k in ARGUMENT_KEYS if obj.get(k) is not None), None)
    if args_m is None:
        return ToolCall(name, "", obj.end is not None), obj
    end = len(text) if args_m.end is None else args_m.end
    return ToolCall(name, text[args_m.start:end], obj.end is not None), obj


def valid_call(call: ToolCall) -> bool:
    """A finished call whose arguments are a JSON object (absent arguments count as `{}`)."""
    if not call.complete or not call.name:
        return False
    if call.arguments == "":
        call.arguments = "{}"
        return True
    try:
        return isinstance(json.loads(call.arguments), dict)
    except ValueError:
        return False


def finish(text: str, content: str, calls: list[ToolCall], final: bool, ok: bool = True) -> ParsedOutput:
    """The final result is all-or-nothing: every call valid, or the whole text as content."""
    if final and (not ok or not calls or not all(valid_call(c) for c in calls)):
        return ParsedOutput(text, [])
    return ParsedOutput(content, calls)


def before_marker(text: str, marker: str, final: bool) -> ParsedOutput:
    """The parse of text with no `marker` yet: all of it is content, except (while streaming) a
    suffix that may still become the marker, which is held back until it is known."""
    if final:
        return ParsedOutput(text)
    return ParsedOutput(text[:len(text) - held_back(text, marker)].rstrip())


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (text that
    may turn out to be the start of a tool call, so it is not streamed as content yet)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def scan_sequence(text: str, i: int, sep: str, close: str | None) -> tuple[list[ToolCall], bool, int | None]:
    """Call objects from `text[i]` on, separated by `sep`, up to `close` (or the end of the
    text when `close` is None). Returns (calls, ok, end): ok is False when the text cannot be
    such a sequence; end is one past `close`, None while unfinished."""
    calls: list[ToolCall] = []
    i = skip_ws(text, i)
    while i < len(text):
        if close is not None and text[i] == close and not calls:
            return calls, True, i + 1
        call, obj = call_from_object(text, i)
        if obj.error:
            return calls, False, None
        if call is not None:
            calls.append(call)
        if obj.end is None:
            return calls, True, None
        if call is None:
            return calls, False, None  # a finished object with no usable name
        i = skip_ws(text, obj.end)
        if i >= len(text):
            return calls, True, None
        if close is not None and text[i] == close:
            return calls, True, i + 1
        if text[i] != sep:
            return calls, False, None
        i = skip_ws(text, i + 1)
    return calls, True, None
