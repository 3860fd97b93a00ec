"""Errors the engine raises for requests it refuses or cannot serve.

`InvalidParameterError` is a `ValueError` (callers that catch ValueError keep working) that also
names the offending request field in `param`. Its message starts with that field's name, so an
API layer that only sees the text can still tell which field was wrong. `RequestFailedError`
and `EngineDeadError` are what `AsyncEngine` (engine/async_engine.py) raises in request streams.
"""
from __future__ import annotations


class InvalidParameterError(ValueError):
    """A request parameter the engine cannot honour. `param` is the field's name as the client
    spelled it (e.g. "stop_token_ids", "seed"); the message starts with it."""

    def __init__(self, param: str, message: str) -> None:
        if not message.startswith(param):
            message = f"{param}: {message}"
        super().__init__(message)
        self.param = param


class RequestFailedError(RuntimeError):
    """The engine failed while running this request (other requests are unaffected)."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped because of an error; no request can be served any more."""


def show(value: object, limit: int = 40) -> str:
    """A short, ASCII-only repr for error messages: never echoes a whole huge value, and never
    fails (an int too long for str() or a string with lone surrogates is still shown)."""
    try:
        text = ascii(value)
    except ValueError:  # an int past Python's int-to-str digit limit
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit] + "..."
