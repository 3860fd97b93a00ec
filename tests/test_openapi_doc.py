"""The OpenAPI document says what the server accepts: the cases a schema-driven fuzzer found
(empty stop strings, negative token ids, /tokenize with both or neither of prompt/messages, a
missing /v1/usage), checked against the document with a JSON Schema validator."""
from __future__ import annotations

import jsonschema
import pytest
from openapi_spec_validator import validate

from server.openapi import build_openapi

DOC = build_openapi("test")


def valid(schema_name: str, instance) -> bool:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": DOC["components"]}
    return jsonschema.Draft202012Validator(schema).is_valid(instance)


def test_document_is_valid_openapi():
    validate(DOC)


@pytest.mark.parametrize("body,ok", [
    ({"prompt": "x", "stop": ""}, False),
    ({"prompt": "x", "stop": ["a", ""]}, False),
    ({"prompt": "x", "stop": ["a"] * 17}, False),
    ({"prompt": "x", "stop": "a"}, True),
    ({"prompt": ""}, False),
    ({"prompt": [-1]}, False),
    ({"prompt": [[1, 2]]}, True),  # a batch of one
    ({"prompt": ["a", "b"]}, False),
    ({"prompt": "x", "seed": 2 ** 70}, False),
    ({"prompt": "x", "seed": -(2 ** 63)}, True),
    ({"prompt": "x", "stop_token_ids": [-1]}, False),
    ({"prompt": "x", "timeout": 0.0005}, False),
])
def test_completion_request_schema(body, ok):
    assert valid("CompletionRequest", body) is ok


def test_tokenize_needs_exactly_one_of_prompt_and_messages():
    msgs = [{"role": "user", "content": "hi"}]
    assert valid("TokenizeRequest", {"prompt": "hi"})
    assert valid("TokenizeRequest", {"messages": msgs})
    assert not valid("TokenizeRequest", {})
    assert not valid("TokenizeRequest", {"prompt": "hi", "messages": msgs})


def test_detokenize_ids_are_non_negative():
    assert valid("DetokenizeRequest", {"tokens": [0, 5]})
    assert not valid("DetokenizeRequest", {"tokens": [-1]})


def test_top_logprobs_needs_logprobs():
    msgs = [{"role": "user", "content": "hi"}]
    assert valid("ChatCompletionRequest", {"messages": msgs, "top_logprobs": 2, "logprobs": True})
    assert valid("ChatCompletionRequest", {"messages": msgs, "top_logprobs": 0})
    assert not valid("ChatCompletionRequest", {"messages": msgs, "top_logprobs": 2})


def test_usage_route_and_string_error_codes_are_documented():
    usage = DOC["paths"]["/v1/usage"]["get"]
    assert {p["name"] for p in usage["parameters"]} == {"group_by", "start", "end"}
    assert valid("UsageReport", {"object": "list", "group_by": "tenant", "start": None, "end": 5.0,
                                 "data": [{"tenant": "a", "requests": 1, "cost": 0.5}]})
    envelope = {"error": {"message": "m", "type": "t", "param": None, "code": "x"}}
    assert valid("ErrorResponse", envelope)
    assert not valid("ErrorResponse", {"error": {**envelope["error"], "code": 400}})


def test_optional_fields_may_be_null_as_the_server_accepts():
    assert valid("CompletionRequest", {"prompt": "x", "skip_special_tokens": None, "stop": None,
                                       "logit_bias": None, "logprobs": None, "model": None})
    assert not valid("CompletionRequest", {"prompt": None})
    msgs = [{"role": "user", "content": None}]
    assert valid("ChatCompletionRequest", {"messages": msgs, "top_logprobs": None, "logprobs": None,
                                           "stream_options": {"include_usage": None}})
    assert valid("DetokenizeRequest", {"tokens": [], "model": None})
