"""Typed, validated access to the fields of a JSON request body (server/protocol.py's parsers).

Every getter returns the field converted to its Python type, or raises `APIError(400)` whose
`param` names the field (with its path under nested objects, e.g. ``response_format.json_schema``).
"""
from __future__ import annotations

from typing import Any

from engine.errors import show
from server.errors import bad_request


def as_int(value: Any) -> int | None:
    """`value` as an int when it is a JSON integer: an int (not a bool), or a float with no
    fractional part (JSON Schema counts 2.0 as an integer, as do OpenAI's SDKs); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def token_id_list(value: Any) -> list[int] | None:
    """`value` as a list of non-negative ints, or None if it is not one."""
    if not isinstance(value, list):
        return None
    ids = [as_int(v) for v in value]
    return None if any(i is None or i < 0 for i in ids) else ids


class JsonFields:
    """Typed access to a JSON object's fields; each getter raises a 400 naming the field."""

    def __init__(self, body: Any, prefix: str = "") -> None:
        if not isinstance(body, dict):
            raise bad_request(f"{prefix or 'request body'} must be a JSON object", prefix or None)
        self.body = body
        self.prefix = prefix

    def _name(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def _present(self, name: str) -> bool:
        return self.body.get(name) is not None

    def integer(self, name: str, default: int | None = None, lo: int | None = None,
                hi: int | None = None) -> int | None:
        if not self._present(name):
            return default
        value = as_int(self.body[name])
        if value is None:
            raise bad_request(f"{self._name(name)} must be an integer, got {show(self.body[name])}",
                              self._name(name))
        self._range(name, value, lo, hi)
        return value

    def number(self, name: str, default: float | None = None, lo: float | None = None,
               hi: float | None = None) -> float | None:
        if not self._present(name):
            return default
        value = self.body[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise bad_request(f"{self._name(name)} must be a number, got {show(value)}", self._name(name))
        if value in (float("inf"), float("-inf")) or (isinstance(value, int) and abs(value) > 1e308):
            raise bad_request(f"{self._name(name)} must be a finite number", self._name(name))
        self._range(name, value, lo, hi)
        return float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        if not self._present(name):
            return default
        value = self.body[name]
        if not isinstance(value, bool):
            raise bad_request(f"{self._name(name)} must be a boolean, got {show(value)}", self._name(name))
        return value

    def string(self, name: str, default: str | None = None) -> str | None:
        if not self._present(name):
            return default
        value = self.body[name]
        if not isinstance(value, str):
            raise bad_request(f"{self._name(name)} must be a string, got {show(value)}", self._name(name))
        return value

    def int_list(self, name: str) -> list[int] | None:
        if not self._present(name):
            return None
        value = token_id_list(self.body[name])
        if value is None:
            raise bad_request(f"{self._name(name)} must be a list of non-negative integers",
                              self._name(name))
        return value

    def logit_bias(self) -> dict[int, float] | None:
        """OpenAI's `logit_bias`: an object from token ids (as decimal strings) to numbers in
        [-100, 100]; ids past the vocabulary are refused later, by the engine."""
        if not self._present("logit_bias"):
            return None
        value = self.body["logit_bias"]
        if not isinstance(value, dict):
            raise bad_request("logit_bias must be an object mapping token ids to numbers", "logit_bias")
        out = {}
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 18):
                raise bad_request(f"logit_bias keys must be token ids (decimal strings), got {show(key)}",
                                  "logit_bias")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise bad_request(f"logit_bias values must be numbers in [-100, 100], got {show(bias)}",
                                  "logit_bias")
            out[int(key)] = float(bias)
        return out

    def stop(self) -> list[str] | None:
        if not self._present("stop"):
            return None
        value = self.body["stop"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise bad_request("stop must be a non-empty string or a list of non-empty strings", "stop")
        return value

    def _range(self, name: str, value: float, lo: float | None, hi: float | None) -> None:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise bad_request(f"{self._name(name)} must be in {bounds}, got {show(value)}", self._name(name))

    def reject_unsupported(self, name: str) -> None:
        value = self.body.get(name)
        # identity for False: `True in (1,)` holds in Python, and echo=true must be refused
        if not (value is None or value is False or value in ([], {}, "")):
            raise bad_request(f"{name} is not supported by this server", name, code="unsupported")
