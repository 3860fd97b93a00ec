"""The OpenAPI 3.1 description of every route, served at `/openapi.json` (and rendered by
`/docs` with locally served assets)."""
from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {code: _json(_ref("ErrorResponse"), text) for code, text in {
    "400": "Invalid request (the field is named in error.param)",
    "404": "Unknown model or route",
    "408": "The request's timeout passed",
    "413": "Request body too large",
    "503": "Engine not ready or server overloaded (see Retry-After)",
}.items()}

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}
_NULLABLE_STR = {"type": ["string", "null"]}

_SAMPLING = {
    "model": {**_STR, "description": "Defaults to the served model."},
    "max_tokens": {**_INT, "minimum": 1, "description": "Defaults to the rest of the context."},
    "temperature": {**_NUM, "minimum": 0, "maximum": 2, "default": 1},
    "top_p": {**_NUM, "exclusiveMinimum": 0, "maximum": 1, "default": 1},
    "top_k": {**_INT, "minimum": -1, "default": 0, "description": "0 or -1: off."},
    "min_p": {**_NUM, "minimum": 0, "maximum": 1, "default": 0},
    "n": {**_INT, "minimum": 1, "maximum": 128, "default": 1},
    "seed": _INT,
    "presence_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "repetition_penalty": {**_NUM, "exclusiveMinimum": 0, "default": 1},
    "stop": {"oneOf": [_STR, {"type": "array", "items": _STR}]},
    "stop_token_ids": {"type": "array", "items": {**_INT, "minimum": 0}},
    "ignore_eos": _BOOL,
    "min_tokens": {**_INT, "minimum": 0},
    "include_stop_str_in_output": _BOOL,
    "skip_special_tokens": {**_BOOL, "default": True},
    "priority": {**_INT, "description": "Lower runs first under the priority policy."},
    "user": _STR,
    "timeout": {**_NUM, "exclusiveMinimum": 0, "description": "Seconds before the request is aborted."},
    "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
}

_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT,
                         "prompt_tokens_details": {"type": "object",
                                                   "properties": {"cached_tokens": _INT}}}}

_SCHEMAS: dict[str, Any] = {
    "ErrorResponse": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": _STR, "type": _STR, "param": _NULLABLE_STR,
                       "code": {"type": ["string", "integer", "null"]}}}}},
    "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": {
        **_SAMPLING,
        "prompt": {"oneOf": [_STR, {"type": "array", "items": _INT}]},
        "logprobs": {**_INT, "minimum": 0, "maximum": 20}}},
    "ChatMessage": {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [_STR, {"type": "null"}, {"type": "array", "items": {
            "type": "object", "properties": {"type": {"const": "text"}, "text": _STR}}}]}}},
    "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": {
        **_SAMPLING,
        "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
        "max_completion_tokens": {**_INT, "minimum": 1},
        "logprobs": _BOOL, "top_logprobs": {**_INT, "minimum": 0, "maximum": 20},
        "add_generation_prompt": {**_BOOL, "default": True}}},
    "Usage": _USAGE,
    "Completion": {"type": "object", "properties": {
        "id": _STR, "object": {"const": "text_completion"}, "created": _INT, "model": _STR,
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": _INT, "text": _STR, "logprobs": {"type": ["object", "null"]},
            "finish_reason": _NULLABLE_STR}}},
        "usage": _ref("Usage")}},
    "ChatCompletion": {"type": "object", "properties": {
        "id": _STR, "object": {"const": "chat.completion"}, "created": _INT, "model": _STR,
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": _INT, "message": {"type": "object", "properties": {"role": _STR, "content": _STR}},
            "logprobs": {"type": ["object", "null"]}, "finish_reason": _NULLABLE_STR}}},
        "usage": _ref("Usage")}},
    "ModelList": {"type": "object", "properties": {"object": {"const": "list"}, "data": {
        "type": "array", "items": {"type": "object", "properties": {
            "id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR,
            "max_model_len": _INT}}}}},
    "TokenizeRequest": {"type": "object", "properties": {
        "model": _STR, "prompt": _STR, "messages": {"type": "array", "items": _ref("ChatMessage")},
        "add_special_tokens": {**_BOOL, "default": True}}},
    "TokenizeResponse": {"type": "object", "properties": {
        "tokens": {"type": "array", "items": _INT}, "count": _INT, "max_model_len": _INT}},
    "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
        "model": _STR, "tokens": {"type": "array", "items": _INT}}},
    "DetokenizeResponse": {"type": "object", "properties": {"prompt": _STR}},
}


def _generation(summary: str, request: str, response: str) -> dict:
    return {"post": {
        "summary": summary,
        "parameters": [{"name": "X-Request-Id", "in": "header", "required": False, "schema": _STR}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": "The completion; with stream=true, server-sent events of "
                                   "chunks ending with `data: [DONE]`",
                    "content": {"application/json": {"schema": _ref(response)},
                                "text/event-stream": {"schema": _STR}}},
            **_ERRORS}}}


def _simple(method: str, summary: str, response: dict, request: str | None = None) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": response, **_ERRORS}}
    if request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    return {method: op}


def build_openapi(version: str) -> dict:
    """The whole document; it validates as OpenAPI 3.1."""
    text = {"description": "Plain text", "content": {"text/plain": {"schema": _STR}}}
    html = {"description": "HTML page", "content": {"text/html": {"schema": _STR}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Conveyor", "version": version,
                 "description": "OpenAI-compatible LLM inference server."},
        "paths": {
            "/v1/completions": _generation("Text completion", "CompletionRequest", "Completion"),
            "/v1/chat/completions": _generation("Chat completion", "ChatCompletionRequest",
                                                "ChatCompletion"),
            "/v1/models": _simple("get", "Served models", _json(_ref("ModelList"), "Models")),
            "/tokenize": _simple("post", "Tokenize a prompt or chat messages",
                                 _json(_ref("TokenizeResponse"), "Token ids"), "TokenizeRequest"),
            "/detokenize": _simple("post", "Token ids to text",
                                   _json(_ref("DetokenizeResponse"), "Text"), "DetokenizeRequest"),
            "/health": _simple("get", "200 when the engine is ready, 503 otherwise",
                               _json({"type": "object"}, "Healthy")),
            "/version": _simple("get", "Server version",
                                _json({"type": "object", "properties": {"version": _STR}}, "Version")),
            "/metrics": _simple("get", "Prometheus metrics", text),
            "/openapi.json": _simple("get", "This document", _json({"type": "object"}, "OpenAPI")),
            "/docs": _simple("get", "Interactive API console (Swagger UI)", html),
            "/": _simple("get", "Chat playground", html),
        },
        # Optional bearer auth (servers run open unless their config lists API keys); it gives
        # the /docs console its "Authorize" button.
        "security": [{}, {"apiKey": []}],
        "components": {"schemas": _SCHEMAS,
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
    }
