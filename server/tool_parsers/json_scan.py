"""An incremental scanner for the JSON a model writes while it is still writing it.

`scan_object(text, i)` reads the object starting at `text[i]` (which must be `{`) as far as
`text` goes and reports each top-level member: its key and the raw span of its value, with
`end=None` for a value not finished yet. Raw spans are what make streaming exact: a tool call's
`arguments` is the model's own text of that value, so the part streamed while the value is
unfinished is always a prefix of the final string (never re-serialized, never reordered).
"""
from __future__ import annotations

from dataclasses import dataclass, field

WS = " \t\r\n"


@dataclass
class Member:
    key: str
    start: int  # index of the value's first character
    end: int | None  # one past its last character; None while unfinished


@dataclass
class ScannedObject:
    members: list[Member] = field(default_factory=list)
    end: int | None = None  # one past the closing brace; None while unfinished
    error: bool = False  # the text cannot be a JSON object (not merely unfinished)

    def get(self, key: str) -> Member | None:
        return next((m for m in self.members if m.key == key), None)


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """`text[i]` is a quote: one past the closing quote, or None if unfinished."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def value_end(text: str, i: int) -> int | None | bool:
    """One past the JSON value starting at `text[i]`; None if unfinished; False if it cannot
    be a value."""
    if i >= len(text):
        return None
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                end = _string_end(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    if c in "-0123456789tfn":
        j = i
        while j < len(text) and text[j] not in WS + ",}]":
            j += 1
        return None if j == len(text) else j  # a number may still be growing
    return False


def scan_object(text: str, i: int) -> ScannedObject:
    out = ScannedObject()
    if i >= len(text):
        return out
    if text[i] != "{":
        out.error = True
        return out
    i = skip_ws(text, i + 1)
    if i < len(text) and text[i] == "}":
        out.end = i + 1
        return out
    while True:
        if i >= len(text):
            return out
        if text[i] != '"':
            out.error = True
            return out
        kend = _string_end(text, i)
        if kend is None:
            return out
        import json  # noqa: PLC0415 - keys are short; json decodes their escapes

        try:
            key = json.loads(text[i:kend])
        except ValueError:
            out.error = True
            return out
        i = skip_ws(text, kend)
        if i >= len(text):
            return out
        if text[i] != ":":
            out.error = True
            return out
        i = skip_ws(text, i + 1)
        if i >= len(text):
            return out
        end = value_end(text, i)
        if end is False:
            out.error = True
            return out
        out.members.append(Member(key, i, end))
        if end is None:
            return out
        i = skip_ws(text, end)
        if i >= len(text):
            return out
        if text[i] == "}":
            out.end = i + 1
            return out
        if text[i] != ",":
            out.error = True
            return out
        i = skip_ws(text, i + 1)
