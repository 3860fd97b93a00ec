"""API errors in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.

Messages are written for API users: they never carry tracebacks, file paths or internal class
names. Anything unexpected becomes a generic 500 whose details go only to the server log.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}

# `code` when an error names none: always a string (clients switch on it), never the status.
_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    409: "conflict",
    413: "request_too_large",
    422: "unprocessable_request",
    429: "rate_limit_exceeded",
    500: "internal_error",
    503: "service_unavailable",
}


@dataclass
class APIError(Exception):
    """An error the client should see as-is."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After
    headers: dict[str, str] | None = None  # extra response headers (e.g. x-ratelimit-*)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {
            "message": self.message,
            "type": self.type or _TYPES.get(self.status, "server_error"),
            "param": self.param,
            "code": self.code if self.code is not None else _CODES.get(self.status, "error"),
        }}

    def to_response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = {**(self.headers or {}), **(headers or {})}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def to_sse(self) -> str:
        """The in-band form used once a stream has started."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error() -> APIError:
    return APIError(500, "The server had an internal error while processing the request.",
                    type="server_error", code="internal_error")


def param_from_message(message: str, known: tuple[str, ...]) -> str | None:
    """The field a validation message is about: engine messages start with the field name."""
    head = message.split(" ", 1)[0].strip(":,")
    return head if head in known else None
