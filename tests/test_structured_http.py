"""Structured outputs through HTTP with the official `openai` client, on a tiny random model:
OpenAI's `response_format` (json_schema, json_object) streamed and not, vLLM's
`structured_outputs` / `guided_*` extras, and bad constraints refused with 400 naming the field
before the request is queued."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.structured_schemas import random_schemas
from tests.test_server_harness import start_tiny_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_tiny_server(tmp_path_factory.mktemp("so-http"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _model(client):
    return client.models.list().data[0].id


def test_response_format_json_schema_streamed_and_not(client):
    model = _model(client)
    for i, schema in enumerate(random_schemas(4, seed=7)):
        kwargs = dict(model=model, messages=[{"role": "user", "content": f"Give item {i}"}], max_tokens=48,
                      temperature=0.9, seed=i,
                      response_format={"type": "json_schema", "json_schema": {"name": "item", "schema": schema,
                                                                              "strict": True}})
        out = client.chat.completions.create(**kwargs)
        text, finish = out.choices[0].message.content, out.choices[0].finish_reason
        if finish == "stop":
            jsonschema.validate(json.loads(text), schema)
        else:
            assert finish == "length"
        streamed, reason = "", None
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                streamed += c.delta.content or ""
                reason = c.finish_reason or reason
        assert (streamed, reason) == (text, finish)


def test_json_object_and_vllm_extras_on_completions(client):
    model = _model(client)
    obj = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON please"}],
                                         max_tokens=40, temperature=0, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = r"[A-Z][a-z]{2,5} [0-9]{2}"
    for extra in ({"structured_outputs": {"regex": regex}}, {"guided_regex": regex}):
        out = client.completions.create(model=model, prompt="Name and age:", max_tokens=20, temperature=1.0, n=2,
                                        seed=4, extra_body=extra)
        assert all(re.fullmatch(regex, c.text) and c.finish_reason == "stop" for c in out.choices), out.choices
    choices = ["alpha", "beta", "gamma"]
    for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        out = client.completions.create(model=model, prompt="Pick:", max_tokens=8, temperature=1.0, seed=1,
                                        extra_body=extra)
        assert out.choices[0].text in choices
    stream = client.completions.create(model=model, prompt="Pick:", max_tokens=8, stream=True,
                                       extra_body={"guided_grammar": 'root ::= "yes" | "no"'})
    assert "".join(c.choices[0].text for c in stream if c.choices) in ("yes", "no")
    schema = {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}
    out = client.completions.create(model=model, prompt="Flags:", max_tokens=30, temperature=0,
                                    extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(out.choices[0].text), schema)


def test_bad_constraints_are_400_naming_the_field(server):
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": "root ::= missing"}, "guided_grammar"),  # refused by the compiler itself
        ({"guided_regex": "a", "guided_json": {"type": "object"}}, "guided_regex"),
    ]
    for extra, param in cases:
        r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                       json={"prompt": "x", "max_tokens": 4, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    # response_format text is no constraint at all
    r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                   json={"prompt": "x", "max_tokens": 2, "response_format": {"type": "text"}})
    assert r.status_code == 200
