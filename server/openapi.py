"""The OpenAPI 3.1 description of every route, served at `/openapi.json` (and rendered by
`/docs` with locally served assets).

It describes what the server accepts, as tightly as a schema can: a request it marks valid
is accepted unless it breaks a rule that depends on the model or the server's settings (token
ids below the vocabulary size, prompt + max_tokens within the context, total size of stop
strings, configured caps), and those rules are stated in the field descriptions.
"""
from __future__ import annotations

from typing import Any

from engine.sampling_params import SEED_RANGE
from server.responses.request import PASSTHROUGH as RESPONSES_PASSTHROUGH


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {code: _json(_ref("ErrorResponse"), text) for code, text in {
    "400": "Invalid request (the field is named in error.param)",
    "401": "Missing or unknown API key (servers configured with keys)",
    "403": "The API key may not use this model or route",
    "404": "Unknown model or route",
    "408": "The request's timeout passed",
    "409": "Idempotency key in use by a request still running",
    "413": "Request body too large",
    "422": "Idempotency key reused with a different request",
    "429": "Rate limit exceeded (see Retry-After and x-ratelimit-* headers)",
    "500": "Internal error (details only in the server log)",
    "503": "Engine not ready or server overloaded (see Retry-After)",
}.items()}

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_INT64 = {"type": "integer", "minimum": -(2 ** 63), "maximum": 2 ** 63 - 1}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}
_NULLABLE_STR = {"type": ["string", "null"]}
_TOKEN_ID = {**_INT, "minimum": 0, "description": "Below the model's vocabulary size."}
_NONEMPTY_STR = {**_STR, "minLength": 1}
_MODEL_DEFAULT = "Unset: the model's default (its generation_config; see --generation-config), else "

def _or_null(schema: dict) -> dict:
    """`schema`, also allowing null: the server treats an optional field sent as null as absent
    (as OpenAI's API does)."""
    if "oneOf" in schema:
        return {**schema, "oneOf": [*schema["oneOf"], {"type": "null"}]}
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None]}
    kind = schema["type"]
    return {**schema, "type": [*(kind if isinstance(kind, list) else [kind]), "null"]}


def _optional(properties: dict) -> dict:
    return {name: _or_null(schema) for name, schema in properties.items()}


_SAMPLING = {
    "model": {**_STR, "description": "Defaults to the served model."},
    "max_tokens": {**_INT, "minimum": 1, "maximum": 2 ** 63 - 1,
                   "description": "Defaults to the rest of the context; prompt + max_tokens must fit "
                                  "in the context (and under the server's cap, if any)."},
    "temperature": {**_NUM, "minimum": 0, "maximum": 2, "description": _MODEL_DEFAULT + "1. 0: greedy."},
    "top_p": {**_NUM, "exclusiveMinimum": 0, "maximum": 1, "description": _MODEL_DEFAULT + "1."},
    "top_k": {**_INT, "minimum": -1, "maximum": 2 ** 63 - 1, "description": _MODEL_DEFAULT + "off (0 or -1)."},
    "min_p": {**_NUM, "minimum": 0, "maximum": 1, "description": _MODEL_DEFAULT + "0."},
    "n": {**_INT, "minimum": 1, "maximum": 128, "default": 1},
    "seed": {**_INT, "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]},
    "presence_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "repetition_penalty": {**_NUM, "exclusiveMinimum": 0, "description": _MODEL_DEFAULT + "1."},
    "stop": {"oneOf": [_NONEMPTY_STR, {"type": "array", "items": _NONEMPTY_STR, "maxItems": 16}],
             "description": "Up to 16 strings of at most 4096 characters in total (the engine's "
                            "max_stop_strings / max_stop_chars)."},
    "stop_token_ids": {"type": "array", "items": _TOKEN_ID},
    "logit_bias": {"type": "object", "propertyNames": {"pattern": "^[0-9]{1,18}$"},
                   "additionalProperties": {**_NUM, "minimum": -100, "maximum": 100},
                   "description": "Token id (below the vocabulary size) -> added to its logit."},
    "allowed_token_ids": {"type": "array", "minItems": 1, "items": _TOKEN_ID,
                          "description": "Only these tokens can be generated."},
    "ignore_eos": _BOOL,
    "min_tokens": {**_INT, "minimum": 0, "maximum": 2 ** 63 - 1, "description": "At most max_tokens."},
    "include_stop_str_in_output": _BOOL,
    "skip_special_tokens": {**_BOOL, "default": True},
    "priority": {**_INT64, "description": "Lower runs first under the priority policy."},
    "user": _STR,
    "timeout": {**_NUM, "minimum": 0.001, "description": "Seconds before the request is aborted."},
    "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _or_null(_BOOL)}},
    # structured outputs (server/structured_request.py): at most one of these per request
    "response_format": {"oneOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"const": "json_schema"},
            "json_schema": {"type": "object", "properties": {
                "name": _STR, "description": _STR, "strict": _or_null(_BOOL),
                "schema": {"type": "object", "description": "A JSON schema; absent: any JSON object."}}}}}],
        "description": "OpenAI's: text (default), json_object, or json_schema. Only one of response_format, "
                       "structured_outputs and guided_* per request."},
    "structured_outputs": {"type": "object", "minProperties": 1, "maxProperties": 1, "properties": {
        "json": {"type": "object", "description": "A JSON schema."},
        "regex": {**_NONEMPTY_STR, "format": "regex"},
        "choice": {"type": "array", "minItems": 1, "items": _NONEMPTY_STR},
        "grammar": {**_NONEMPTY_STR, "description": "EBNF (xgrammar / GBNF dialect), start rule root."}},
        "description": "vLLM's: exactly one of json, regex, choice, grammar."},
    "guided_json": {"type": "object", "description": "vLLM's older name of structured_outputs.json."},
    "guided_regex": {**_NONEMPTY_STR, "format": "regex"},
    "guided_choice": {"type": "array", "minItems": 1, "items": _NONEMPTY_STR},
    "guided_grammar": _NONEMPTY_STR,
}

_FUNCTION_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": _NONEMPTY_STR, "description": _STR,
        "parameters": {"type": "object", "description": "A JSON schema of the arguments."}}}}}
_TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "id": _STR, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {"name": _STR, "arguments": _STR}}}}
_TOOLS = {
    "tools": {"type": "array", "items": _FUNCTION_TOOL,
              "description": "Functions the model may call; rendered by the model's chat template."},
    "tool_choice": {"oneOf": [
        {"enum": ["none", "auto", "required"]},
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": {"name": _STR}}}}],
        "description": "auto (default with tools): the model decides; required / a named function: the "
                       "output is forced (structured outputs) to valid calls. Needs tools."},
    "parallel_tool_calls": {**_BOOL, "default": True},
}

_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT,
                         "prompt_tokens_details": {"type": "object",
                                                   "properties": {"cached_tokens": _INT}}}}

_TOKEN_IDS = {"type": "array", "minItems": 1, "items": _TOKEN_ID}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": _STR}}
_RESPONSES_CONTENT = {"oneOf": [_STR, {"type": "array", "items": {
    "type": "object", "required": ["type", "text"],
    "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": _STR}}}]}
_USAGE_GROUPS = ["tenant", "user", "feature", "model"]  # server/usage.py GROUPS
_TIME = {"anyOf": [_NUM, {**_STR, "format": "date-time"}],
         "description": "A unix timestamp (finite) or an ISO-8601 time."}

_SCHEMAS: dict[str, Any] = {
    "ErrorResponse": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": _STR, "type": _STR, "param": _NULLABLE_STR, "code": _STR}}}},
    "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": {
        **_optional(_SAMPLING),
        "prompt": {"oneOf": [_NONEMPTY_STR, _TOKEN_IDS,
                             {"type": "array", "minItems": 1, "maxItems": 1,
                              "items": {"oneOf": [_NONEMPTY_STR, _TOKEN_IDS]},
                              "description": "A batch of one prompt."}]},
        "logprobs": _or_null({**_INT, "minimum": 0, "maximum": 20})}},
    "ChatMessage": {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [_STR, {"type": "null"}, {"type": "array", "items": _TEXT_PART}]},
        **_optional({"tool_calls": {"type": "array", "items": _TOOL_CALL,
                                    "description": "An assistant message's calls (send them back with the results)."},
                     "tool_call_id": {**_STR, "description": "A tool message: the call it answers."},
                     "name": _STR})}},
    "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": {
        **_optional(_SAMPLING),
        "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
        **_optional({
            "max_completion_tokens": {**_INT, "minimum": 1, "maximum": 2 ** 63 - 1},
            "logprobs": _BOOL, "top_logprobs": {**_INT, "minimum": 0, "maximum": 20,
                                                "description": "Needs logprobs: true."},
            "add_generation_prompt": {**_BOOL, "default": True}, **_TOOLS})},
        # top_logprobs above 0 needs logprobs: true
        "dependentSchemas": {"top_logprobs": {"anyOf": [
            {"properties": {"top_logprobs": {"enum": [0, None]}}},
            {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}]}}},
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
            "index": _INT, "message": {"type": "object", "properties": {
                "role": _STR, "content": _NULLABLE_STR, "tool_calls": {"type": "array", "items": _TOOL_CALL}}},
            "logprobs": {"type": ["object", "null"]}, "finish_reason": _NULLABLE_STR}}},
        "usage": _ref("Usage")}},
    "ModelList": {"type": "object", "properties": {"object": {"const": "list"}, "data": {
        "type": "array", "items": {"type": "object", "properties": {
            "id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR,
            "root": _STR, "parent": _or_null(_STR), "max_model_len": _INT}}}}},
    "TokenizeRequest": {
        "type": "object",
        "description": "Exactly one of prompt or messages.",
        "properties": {"model": _or_null(_STR), "prompt": _STR,
                       "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
                       "add_special_tokens": _or_null({**_BOOL, "default": True})},
        "oneOf": [{"required": ["prompt"], "not": {"required": ["messages"]}},
                  {"required": ["messages"], "not": {"required": ["prompt"]}}]},
    "TokenizeResponse": {"type": "object", "properties": {
        "tokens": {"type": "array", "items": _INT}, "count": _INT, "max_model_len": _INT}},
    "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
        "model": _or_null(_STR), "tokens": {"type": "array", "items": _TOKEN_ID}}},
    "DetokenizeResponse": {"type": "object", "properties": {"prompt": _STR}},
    "LoadLoRAAdapterRequest": {"type": "object", "required": ["lora_name", "lora_path"], "properties": {
        "lora_name": _STR, "lora_path": _STR, "base_model_name": _or_null(_STR)}},
    "UnloadLoRAAdapterRequest": {"type": "object", "required": ["lora_name"], "properties": {"lora_name": _STR}},
    "ResponsesRequest": {"type": "object", "required": ["input"], "properties": {
        # the Responses fields, and the chat sampling extras the endpoint passes through unchanged
        **{k: _or_null(_SAMPLING[k]) for k in RESPONSES_PASSTHROUGH if k in _SAMPLING},
        "input": {"oneOf": [_NONEMPTY_STR, {"type": "array", "minItems": 1, "items": {"oneOf": [
            _ref("ResponsesMessage"), _ref("ResponsesFunctionCall"), _ref("ResponsesFunctionCallOutput")]}}],
            "description": "A string (one user message) or a list of input items. Stateless: send the whole "
                           "conversation (previous_response_id and conversation are refused)."},
        **_optional({
            "instructions": {**_STR, "description": "A system message before the input."},
            "max_output_tokens": {**_INT, "minimum": 1, "maximum": 2 ** 63 - 1,
                                  "description": "Defaults to the rest of the context."},
            "text": {"type": "object", "properties": {"format": _or_null({"oneOf": [
                {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
                {"type": "object", "required": ["type", "name", "schema"], "properties": {
                    "type": {"const": "json_schema"}, "name": _NONEMPTY_STR, "schema": {"type": "object"},
                    "strict": _or_null(_BOOL), "description": _or_null(_STR)}}]})}},
            "tools": {"type": "array", "items": {"type": "object", "required": ["type", "name"], "properties": {
                "type": {"const": "function"}, "name": _NONEMPTY_STR, "description": _or_null(_STR),
                "parameters": _or_null({"type": "object", "description": "A JSON schema of the arguments."}),
                "strict": _or_null(_BOOL)}}},
            "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]},
                                      {"type": "object", "required": ["type", "name"], "properties": {
                                          "type": {"const": "function"}, "name": _STR}}],
                            "description": "required / a named function (one of tools) force a call; needs tools."},
            "parallel_tool_calls": {**_BOOL, "default": True},
            "store": {**_BOOL, "description": "Accepted, but nothing is stored (the response says false)."},
            "metadata": {"type": "object", "additionalProperties": _STR},
            "truncation": {"enum": ["disabled"]}})},
        # required / a named function need tools to call
        "dependentSchemas": {"tool_choice": {"anyOf": [
            {"properties": {"tool_choice": {"enum": ["none", "auto", None]}}},
            {"required": ["tools"], "properties": {"tools": {"minItems": 1}}}]}}},
    "ResponsesMessage": {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"const": "message"}, "role": {"enum": ["user", "assistant", "system", "developer"]},
        "content": _RESPONSES_CONTENT}},
    "ResponsesFunctionCall": {"type": "object", "required": ["type", "call_id", "name"], "properties": {
        "type": {"const": "function_call"}, "call_id": _NONEMPTY_STR, "name": _NONEMPTY_STR,
        "arguments": {**_STR, "description": "The call's arguments as JSON text."}}},
    "ResponsesFunctionCallOutput": {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"}, "call_id": _NONEMPTY_STR, "output": _RESPONSES_CONTENT}},
    "Response": {"type": "object", "required": ["id", "object", "status", "output"], "properties": {
        "id": _STR, "object": {"const": "response"}, "created_at": _INT, "model": _STR,
        "status": {"enum": ["completed", "incomplete", "in_progress", "failed"]},
        "output": {"type": "array", "items": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["message", "function_call"]}}}},
        "usage": {"type": ["object", "null"], "properties": {
            "input_tokens": _INT, "output_tokens": _INT, "total_tokens": _INT}}}},
    "EmbeddingRequest": {"type": "object", "required": ["input"], "properties": {
        "input": {"oneOf": [_NONEMPTY_STR, _TOKEN_IDS,
                            {"type": "array", "minItems": 1, "maxItems": 2048,
                             "items": {"oneOf": [_NONEMPTY_STR, _TOKEN_IDS]}}],
                  "description": "A string, token ids, or a list of either (up to 2048); each within "
                                 "the model's context."},
        **_optional({
            "model": {**_STR, "description": "Defaults to the served model."},
            "encoding_format": {"enum": ["float", "base64"], "default": "float",
                                "description": "base64: the little-endian float32 bytes."},
            "dimensions": {**_INT, "minimum": 1, "maximum": 2 ** 63 - 1,
                           "description": "Must equal the model's hidden size (no truncation)."},
            "user": _STR,
            "pooling": {"enum": ["mean", "last"], "default": "mean",
                        "description": "Pooling of the final hidden states: mean (default) or the last "
                                       "token's (for embedding-tuned causal models)."}})}},
    "EmbeddingList": {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
        "object": {"const": "list"}, "model": _STR,
        "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"],
                                            "properties": {
            "object": {"const": "embedding"}, "index": _INT,
            "embedding": {"oneOf": [{"type": "array", "items": _NUM}, _STR]}}}},
        "usage": {"type": "object", "properties": {"prompt_tokens": _INT, "total_tokens": _INT}}}},
    "UsageReport": {"type": "object", "required": ["object", "group_by", "data"], "properties": {
        "object": {"const": "list"}, "group_by": {"enum": _USAGE_GROUPS},
        "start": {"type": ["number", "null"]}, "end": {"type": ["number", "null"]},
        "data": {"type": "array", "items": {"type": "object", "properties": {
            **{g: _STR for g in _USAGE_GROUPS}, "requests": _INT, "prompt_tokens": _INT,
            "cached_tokens": _INT, "completion_tokens": _INT, "cost": _NUM}}}}},
}


# One server-sent event of a stream: `data` is a JSON chunk (Completion / ChatCompletion
# shaped, with deltas), an in-band error envelope, or the final `[DONE]`.
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": _STR, "data": _STR, "id": _STR, "retry": _INT}}


def _generation(summary: str, request: str, response: str) -> dict:
    return {"post": {
        "summary": summary,
        "description": "An `Idempotency-Key` header (1 to 255 visible ASCII characters) makes "
                       "retries safe where the server's config enables idempotency.",
        "parameters": [{"name": "X-Request-Id", "in": "header", "required": False, "schema": _STR}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": "The completion; with stream=true, server-sent events of "
                                   "chunks ending with `data: [DONE]`",
                    "content": {"application/json": {"schema": _ref(response)},
                                "text/event-stream": {"schema": _SSE_EVENT}}},
            **_ERRORS}}}


def _responses_path() -> dict:
    op = _generation("Model response (OpenAI's Responses API, stateless)", "ResponsesRequest", "Response")
    op["post"]["responses"]["200"]["description"] = (
        "The response; with stream=true, typed server-sent events (`event: response.*`, each with a "
        "sequence_number) ending with response.completed, response.incomplete or response.failed")
    return op


def _simple(method: str, summary: str, response: dict, request: str | None = None,
            parameters: list[dict] | None = None) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": response, **_ERRORS}}
    if request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    if parameters:
        op["parameters"] = parameters
    return {method: op}


def build_openapi(version: str) -> dict:
    """The whole document; it validates as OpenAPI 3.1."""
    text = {"description": "Plain text", "content": {"text/plain": {"schema": _STR}}}
    html = {"description": "HTML page", "content": {"text/html": {"schema": _STR}}}
    usage_params = [
        {"name": "group_by", "in": "query", "required": False,
         "schema": {"enum": _USAGE_GROUPS, "default": "tenant"}},
        {"name": "start", "in": "query", "required": False, "schema": _TIME,
         "description": "Only records at or after this time."},
        {"name": "end", "in": "query", "required": False, "schema": _TIME,
         "description": "Only records before this time."},
    ]
    return {
        "openapi": "3.1.0",
        "info": {"title": "Conveyor", "version": version,
                 "description": "OpenAI-compatible LLM inference server."},
        "paths": {
            "/v1/completions": _generation("Text completion", "CompletionRequest", "Completion"),
            "/v1/chat/completions": _generation("Chat completion", "ChatCompletionRequest",
                                                "ChatCompletion"),
            "/v1/responses": _responses_path(),
            "/v1/embeddings": _simple("post", "Embeddings: the model's final hidden states, pooled and "
                                      "L2-normalized", _json(_ref("EmbeddingList"), "Embeddings"),
                                      "EmbeddingRequest"),
            "/v1/models": _simple("get", "Served models", _json(_ref("ModelList"), "Models")),
            "/v1/usage": _simple("get", "Token and cost totals per group (admin keys only)",
                                 _json(_ref("UsageReport"), "Usage report"), parameters=usage_params),
            "/tokenize": _simple("post", "Tokenize a prompt or chat messages",
                                 _json(_ref("TokenizeResponse"), "Token ids"), "TokenizeRequest"),
            "/detokenize": _simple("post", "Token ids to text",
                                   _json(_ref("DetokenizeResponse"), "Text"), "DetokenizeRequest"),
            "/v1/load_lora_adapter": _simple(
                "post", "Load a LoRA adapter, served by its name in `model` (admin keys only; 404 when "
                "LoRA is not enabled)", text, "LoadLoRAAdapterRequest"),
            "/v1/unload_lora_adapter": _simple(
                "post", "Unload a LoRA adapter (admin keys only; 404 for an unknown name or when LoRA "
                "is not enabled)", text, "UnloadLoRAAdapterRequest"),
            "/health": _simple("get", "Liveness: 503 when an engine stopped or stalled (restart the process)",
                               _json({"type": "object"}, "Healthy")),
            "/ready": _simple("get", "Readiness: 200 when every model can serve, 503 otherwise",
                              _json({"type": "object"}, "Ready")),
            "/version": _simple("get", "Server version",
                                _json({"type": "object", "properties": {"version": _STR}}, "Version")),
            "/metrics": _simple("get", "Prometheus metrics", text),
            "/admin/metrics": _simple("get", "Per-tenant Prometheus metrics (admin keys only)", text),
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
