"""The component schemas of the OpenAPI document (server/openapi.py): requests, responses and
the field schemas they share, with the server's rules stated in the field descriptions.

Names without a leading underscore are used by server/openapi.py to build the paths."""
from __future__ import annotations

from typing import Any

from engine.sampling_params import SEED_RANGE
from server.responses.request import PASSTHROUGH as RESPONSES_PASSTHROUGH


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_response(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {code: json_response(ref("ErrorResponse"), text) for code, text in {
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
INT = {"type": "integer"}
_INT64 = {"type": "integer", "minimum": -(2 ** 63), "maximum": 2 ** 63 - 1}
_BOOL = {"type": "boolean"}
STR = {"type": "string"}
_NULLABLE_STR = {"type": ["string", "null"]}
_TOKEN_ID = {**INT, "minimum": 0, "description": "Below the model's vocabulary size."}
_NONEMPTY_STR = {**STR, "minLength": 1}
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
    "model": {**STR, "description": "Defaults to the served model."},
    "max_tokens": {**INT, "minimum": 1, "maximum": 2 ** 63 - 1,
                   "description": "Defaults to the rest of the context; prompt + max_tokens must fit "
                                  "in the context (and under the server's cap, if any)."},
    "temperature": {**_NUM, "minimum": 0, "maximum": 2, "description": _MODEL_DEFAULT + "1. 0: greedy."},
    "top_p": {**_NUM, "exclusiveMinimum": 0, "maximum": 1, "description": _MODEL_DEFAULT + "1."},
    "top_k": {**INT, "minimum": -1, "maximum": 2 ** 63 - 1, "description": _MODEL_DEFAULT + "off (0 or -1)."},
    "min_p": {**_NUM, "minimum": 0, "maximum": 1, "description": _MODEL_DEFAULT + "0."},
    "n": {**INT, "minimum": 1, "maximum": 128, "default": 1},
    "seed": {**INT, "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]},
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
    "min_tokens": {**INT, "minimum": 0, "maximum": 2 ** 63 - 1, "description": "At most max_tokens."},
    "include_stop_str_in_output": _BOOL,
    "skip_special_tokens": {**_BOOL, "default": True},
    "priority": {**_INT64, "description": "Lower runs first under the priority policy."},
    "user": STR,
    "timeout": {**_NUM, "minimum": 0.001, "description": "Seconds before the request is aborted."},
    "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _or_null(_BOOL)}},
    # structured outputs (server/structured_request.py): at most one of these per request
    "response_format": {"oneOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"const": "json_schema"},
            "json_schema": {"type": "object", "properties": {
                "name": STR, "description": STR, "strict": _or_null(_BOOL),
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
        "name": _NONEMPTY_STR, "description": STR,
        "parameters": {"type": "object", "description": "A JSON schema of the arguments."}}}}}
_TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "id": STR, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {"name": STR, "arguments": STR}}}}
_TOOLS = {
    "tools": {"type": "array", "items": _FUNCTION_TOOL,
              "description": "Functions the model may call; rendered by the model's chat template."},
    "tool_choice": {"oneOf": [
        {"enum": ["none", "auto", "required"]},
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": {"name": STR}}}}],
        "description": "auto (default with tools): the model decides; required / a named function: the "
                       "output is forced (structured outputs) to valid calls. Needs tools."},
    "parallel_tool_calls": {**_BOOL, "default": True},
}

_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT,
                         "prompt_tokens_details": {"type": "object",
                                                   "properties": {"cached_tokens": INT}}}}

_TOKEN_IDS = {"type": "array", "minItems": 1, "items": _TOKEN_ID}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": STR}}
_RESPONSES_CONTENT = {"oneOf": [STR, {"type": "array", "items": {
    "type": "object", "required": ["type", "text"],
    "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": STR}}}]}
USAGE_GROUPS = ["tenant", "user", "feature", "model"]  # server/usage.py GROUPS
TIME = {"anyOf": [_NUM, {**STR, "format": "date-time"}],
         "description": "A unix timestamp (finite) or an ISO-8601 time."}

SCHEMAS: dict[str, Any] = {
    "ErrorResponse": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": STR, "type": STR, "param": _NULLABLE_STR, "code": STR}}}},
    "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": {
        **_optional(_SAMPLING),
        "prompt": {"oneOf": [_NONEMPTY_STR, _TOKEN_IDS,
                             {"type": "array", "minItems": 1, "maxItems": 1,
                              "items": {"oneOf": [_NONEMPTY_STR, _TOKEN_IDS]},
                              "description": "A batch of one prompt."}]},
        "logprobs": _or_null({**INT, "minimum": 0, "maximum": 20})}},
    "ChatMessage": {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [STR, {"type": "null"}, {"type": "array", "items": _TEXT_PART}]},
        **_optional({"tool_calls": {"type": "array", "items": _TOOL_CALL,
                                    "description": "An assistant message's calls (send them back with the results)."},
                     "tool_call_id": {**STR, "description": "A tool message: the call it answers."},
                     "name": STR})}},
    "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": {
        **_optional(_SAMPLING),
        "messages": {"type": "array", "minItems": 1, "items": ref("ChatMessage")},
        **_optional({
            "max_completion_tokens": {**INT, "minimum": 1, "maximum": 2 ** 63 - 1},
            "logprobs": _BOOL, "top_logprobs": {**INT, "minimum": 0, "maximum": 20,
                                                "description": "Needs logprobs: true."},
            "add_generation_prompt": {**_BOOL, "default": True}, **_TOOLS})},
        # top_logprobs above 0 needs logprobs: true
        "dependentSchemas": {"top_logprobs": {"anyOf": [
            {"properties": {"top_logprobs": {"enum": [0, None]}}},
            {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}]}}},
    "Usage": _USAGE,
    "Completion": {"type": "object", "properties": {
        "id": STR, "object": {"const": "text_completion"}, "created": INT, "model": STR,
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": INT, "text": STR, "logprobs": {"type": ["object", "null"]},
            "finish_reason": _NULLABLE_STR}}},
        "usage": ref("Usage")}},
    "ChatCompletion": {"type": "object", "properties": {
        "id": STR, "object": {"const": "chat.completion"}, "created": INT, "model": STR,
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": INT, "message": {"type": "object", "properties": {
                "role": STR, "content": _NULLABLE_STR, "tool_calls": {"type": "array", "items": _TOOL_CALL}}},
            "logprobs": {"type": ["object", "null"]}, "finish_reason": _NULLABLE_STR}}},
        "usage": ref("Usage")}},
    "ModelList": {"type": "object", "properties": {"object": {"const": "list"}, "data": {
        "type": "array", "items": {"type": "object", "properties": {
            "id": STR, "object": {"const": "model"}, "created": INT, "owned_by": STR,
            "root": STR, "parent": _or_null(STR), "max_model_len": INT}}}}},
    "TokenizeRequest": {
        "type": "object",
        "description": "Exactly one of prompt or messages.",
        "properties": {"model": _or_null(STR), "prompt": STR,
                       "messages": {"type": "array", "minItems": 1, "items": ref("ChatMessage")},
                       "add_special_tokens": _or_null({**_BOOL, "default": True})},
        "oneOf": [{"required": ["prompt"], "not": {"required": ["messages"]}},
                  {"required": ["messages"], "not": {"required": ["prompt"]}}]},
    "TokenizeResponse": {"type": "object", "properties": {
        "tokens": {"type": "array", "items": INT}, "count": INT, "max_model_len": INT}},
    "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
        "model": _or_null(STR), "tokens": {"type": "array", "items": _TOKEN_ID}}},
    "DetokenizeResponse": {"type": "object", "properties": {"prompt": STR}},
    "LoadLoRAAdapterRequest": {"type": "object", "required": ["lora_name", "lora_path"], "properties": {
        "lora_name": STR, "lora_path": STR, "base_model_name": _or_null(STR)}},
    "UnloadLoRAAdapterRequest": {"type": "object", "required": ["lora_name"], "properties": {"lora_name": STR}},
    "ResponsesRequest": {"type": "object", "required": ["input"], "properties": {
        # the Responses fields, and the chat sampling extras the endpoint passes through unchanged
        **{k: _or_null(_SAMPLING[k]) for k in RESPONSES_PASSTHROUGH if k in _SAMPLING},
        "input": {"oneOf": [_NONEMPTY_STR, {"type": "array", "minItems": 1, "items": {"oneOf": [
            ref("ResponsesMessage"), ref("ResponsesFunctionCall"), ref("ResponsesFunctionCallOutput")]}}],
            "description": "A string (one user message) or a list of input items. Stateless: send the whole "
                           "conversation (previous_response_id and conversation are refused)."},
        **_optional({
            "instructions": {**STR, "description": "A system message before the input."},
            "max_output_tokens": {**INT, "minimum": 1, "maximum": 2 ** 63 - 1,
                                  "description": "Defaults to the rest of the context."},
            "text": {"type": "object", "properties": {"format": _or_null({"oneOf": [
                {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
                {"type": "object", "required": ["type", "name", "schema"], "properties": {
                    "type": {"const": "json_schema"}, "name": _NONEMPTY_STR, "schema": {"type": "object"},
                    "strict": _or_null(_BOOL), "description": _or_null(STR)}}]})}},
            "tools": {"type": "array", "items": {"type": "object", "required": ["type", "name"], "properties": {
                "type": {"const": "function"}, "name": _NONEMPTY_STR, "description": _or_null(STR),
                "parameters": _or_null({"type": "object", "description": "A JSON schema of the arguments."}),
                "strict": _or_null(_BOOL)}}},
            "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]},
                                      {"type": "object", "required": ["type", "name"], "properties": {
                                          "type": {"const": "function"}, "name": STR}}],
                            "description": "required / a named function (one of tools) force a call; needs tools."},
            "parallel_tool_calls": {**_BOOL, "default": True},
            "store": {**_BOOL, "description": "Accepted, but nothing is stored (the response says false)."},
            "metadata": {"type": "object", "additionalProperties": STR},
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
        "arguments": {**STR, "description": "The call's arguments as JSON text."}}},
    "ResponsesFunctionCallOutput": {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"}, "call_id": _NONEMPTY_STR, "output": _RESPONSES_CONTENT}},
    "Response": {"type": "object", "required": ["id", "object", "status", "output"], "properties": {
        "id": STR, "object": {"const": "response"}, "created_at": INT, "model": STR,
        "status": {"enum": ["completed", "incomplete", "in_progress", "failed"]},
        "output": {"type": "array", "items": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["message", "function_call"]}}}},
        "usage": {"type": ["object", "null"], "properties": {
            "input_tokens": INT, "output_tokens": INT, "total_tokens": INT}}}},
    "EmbeddingRequest": {"type": "object", "required": ["input"], "properties": {
        "input": {"oneOf": [_NONEMPTY_STR, _TOKEN_IDS,
                            {"type": "array", "minItems": 1, "maxItems": 2048,
                             "items": {"oneOf": [_NONEMPTY_STR, _TOKEN_IDS]}}],
                  "description": "A string, token ids, or a list of either (up to 2048); each within "
                                 "the model's context."},
        **_optional({
            "model": {**STR, "description": "Defaults to the served model."},
            "encoding_format": {"enum": ["float", "base64"], "default": "float",
                                "description": "base64: the little-endian float32 bytes."},
            "dimensions": {**INT, "minimum": 1, "maximum": 2 ** 63 - 1,
                           "description": "Must equal the model's hidden size (no truncation)."},
            "user": STR,
            "pooling": {"enum": ["mean", "last"], "default": "mean",
                        "description": "Pooling of the final hidden states: mean (default) or the last "
                                       "token's (for embedding-tuned causal models)."}})}},
    "EmbeddingList": {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
        "object": {"const": "list"}, "model": STR,
        "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"],
                                            "properties": {
            "object": {"const": "embedding"}, "index": INT,
            "embedding": {"oneOf": [{"type": "array", "items": _NUM}, STR]}}}},
        "usage": {"type": "object", "properties": {"prompt_tokens": INT, "total_tokens": INT}}}},
    "UsageReport": {"type": "object", "required": ["object", "group_by", "data"], "properties": {
        "object": {"const": "list"}, "group_by": {"enum": USAGE_GROUPS},
        "start": {"type": ["number", "null"]}, "end": {"type": ["number", "null"]},
        "data": {"type": "array", "items": {"type": "object", "properties": {
            **{g: STR for g in USAGE_GROUPS}, "requests": INT, "prompt_tokens": INT,
            "cached_tokens": INT, "completion_tokens": INT, "cost": _NUM}}}}},
}
