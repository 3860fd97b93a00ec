"""Rewrites of a JSON schema before xgrammar compiles it, for what xgrammar gets wrong.

xgrammar 0.2 compiles a string with `minLength` / `maxLength` to a character class that lets
raw control characters (U+0000-U+001F) through and forbids escapes, so the output may not be
valid JSON (json.loads refuses a raw control character in a string). Such a string gets an
equivalent `pattern` over JSON string characters instead: one unescaped non-control
character or one escape per character, `{min,max}` times.
"""
from __future__ import annotations

import copy
from typing import Any

_CHAR = r'([^\x00-\x1f"\\]|\\(["\\/bfnrt]|u[0-9a-fA-F]{4}))'
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "contains")


def fix_schema(schema: Any) -> Any:
    """A copy of `schema` with length-bounded strings turned into patterns; the instances it
    accepts are unchanged."""
    schema = copy.deepcopy(schema)
    _fix(schema)
    return schema


def _fix(s: Any) -> None:
    if not isinstance(s, dict):
        return
    bounded = "minLength" in s or "maxLength" in s
    if s.get("type") == "string" and bounded and not ({"pattern", "enum", "const", "format"} & s.keys()):
        lo, hi = int(s.pop("minLength", 0)), s.pop("maxLength", None)
        s["pattern"] = f"^{_CHAR}{{{lo},{'' if hi is None else int(hi)}}}$"
    for key in _SUBSCHEMA_LISTS:
        for sub in s.get(key) or ():
            _fix(sub)
    for key in _SUBSCHEMA_MAPS:
        for sub in (s.get(key) or {}).values():
            _fix(sub)
    for key in _SUBSCHEMAS:
        _fix(s.get(key))
