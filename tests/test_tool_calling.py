"""Tool calling: the parsers on recorded outputs under random re-chunkings (streamed deltas
concatenate to exactly the non-streamed result), and chat requests with `tools` through the
official `openai` client against a tiny random model: forced calls (`"required"`, a named
function) are valid for the function's schema whatever the model, streamed and not, a
two-turn conversation sends the result back, `"none"` / `"auto"` never fail."""
from __future__ import annotations

import json
import random

import httpx
import jsonschema
import openai
import pytest

from server.tool_parsers import NamedFunctionParser, default_parser_name, make_parser
from server.tool_parsers.streaming import ToolCallStreamer
from tests.test_server_harness import start_tiny_server

RECORDED = {
    "hermes": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
    "qwen": '<tool_call>\n{"name": "search", "arguments": {"q": "a \\"quoted\\" } brace", "n": [1, 2]}}\n</tool_call>',
    "mistral": '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": [2, "}"]}}, '
               '{"name": "x", "arguments": {"q": "a\\"b"}}]',
    "llama3_json": '<|python_tag|>{"name": "search", "parameters": {"query": "x y"}}; '
                   '{"name": "s2", "parameters": {"n": -1.5e3}}',
    "json_array": '[{"name": "f", "parameters": {"a": true, "b": null}}, {"name": "g", "parameters": {}}]',
}
EXPECTED = {
    "hermes": ("Let me check.", [("get_weather", '{"city": "Paris", "unit": "c"}'),
                                 ("get_time", '{"tz": "Europe/Paris"}')]),
    "qwen": ("", [("search", '{"q": "a \\"quoted\\" } brace", "n": [1, 2]}')]),
    "mistral": ("", [("add", '{"a": 1, "b": [2, "}"]}'), ("x", '{"q": "a\\"b"}')]),
    "llama3_json": ("", [("search", '{"query": "x y"}'), ("s2", '{"n": -1.5e3}')]),
    "json_array": ("", [("f", '{"a": true, "b": null}'), ("g", "{}")]),
}


def _stream(parser, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]]]:
    """Feeds `text` cut at `cuts` through a streamer; returns the concatenated content and
    calls (checking each call's id and name come exactly once, first)."""
    streamer = ToolCallStreamer(parser)
    content, calls = "", {}
    for end in cuts + [len(text)]:
        delta, entries = streamer.update(text[:end], end == len(text))
        content += delta
        for e in entries:
            if e["index"] not in calls:
                assert e["id"].startswith("call_") and e["function"]["name"], e
                calls[e["index"]] = [e["function"]["name"], ""]
            else:
                assert "id" not in e and "name" not in e["function"], e
            calls[e["index"]][1] += e["function"]["arguments"]
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_streamed_deltas_concatenate_to_the_parse_whatever_the_chunking(name):
    text = RECORDED[name]
    final = make_parser(name).parse(text, True)
    assert (final.content, [(c.name, c.arguments) for c in final.calls]) == EXPECTED[name]
    rng = random.Random(name)
    for _ in range(300):
        k = rng.choice([0, 1, 2, 5, 20, len(text) - 1])
        cuts = sorted(rng.sample(range(1, len(text)), min(k, len(text) - 1)))
        assert _stream(make_parser(name), text, cuts) == EXPECTED[name]


def test_named_function_and_unparseable_output():
    args = '{"city": "Rome"}'
    assert _stream(NamedFunctionParser("w"), args, [1, 5, 9]) == ("", [("w", args)])
    for name, text in [("hermes", 'Sure <tool_call>{"name": 3}</tool_call>'), ("hermes", "<tool_call>{oops"),
                       ("mistral", "[TOOL_CALLS] not json"), ("llama3_json", '{"name": "f", "parameters": [1]}'),
                       ("hermes", "just text, no calls"), ("json_array", "[]")]:
        parsed = make_parser(name).parse(text, True)
        assert parsed.calls == [] and parsed.content == text, (name, text)
    assert default_parser_name("... [TOOL_CALLS] ...") == "mistral"
    assert default_parser_name("{{ '<|python_tag|>' }}") == "llama3_json"
    assert default_parser_name("<tool_call>") == default_parser_name(None) == "hermes"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
               "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                                       "required": ["tz"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_tiny_server(tmp_path_factory.mktemp("tools"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _model(client):
    return client.models.list().data[0].id


def _valid_calls(calls):
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _collect(stream):
    calls, content, finish, usage = {}, "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                if tc.id:
                    calls[tc.index] = [tc.function.name, ""]
                calls[tc.index][1] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish, usage


def test_required_tool_calls_are_valid_streamed_and_not(client):
    kwargs = dict(model=_model(client), messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                  max_tokens=80, temperature=0.8, seed=3)
    out = client.chat.completions.create(**kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _valid_calls(choice.message.tool_calls)
    assert out.usage.completion_tokens > 0 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    content, calls, finish, usage = _collect(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert content == "" and finish == "tool_calls"
    assert calls == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert usage.completion_tokens == out.usage.completion_tokens


def test_named_function_and_single_call(client):
    kwargs = dict(model=_model(client), messages=ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=1.0,
                  seed=11, tool_choice={"type": "function", "function": {"name": "get_time"}})
    out = client.chat.completions.create(**kwargs)
    calls = out.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    _valid_calls(calls)
    assert _collect(client.chat.completions.create(**kwargs, stream=True))[1] == \
        [("get_time", calls[0].function.arguments)]
    one = client.chat.completions.create(model=_model(client), messages=ASK, tools=[WEATHER, TIME],
                                         tool_choice="required", parallel_tool_calls=False, max_tokens=80,
                                         temperature=1.0, seed=5)
    assert len(one.choices[0].message.tool_calls) == 1


def test_two_turn_conversation_sends_the_result_back(client):
    first = client.chat.completions.create(model=_model(client), messages=ASK, tools=[WEATHER],
                                           tool_choice="required", max_tokens=60, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "unit": "c"})}]
    second = client.chat.completions.create(model=_model(client), messages=messages, tools=[WEATHER],
                                            max_tokens=12, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt
    none = client.chat.completions.create(model=_model(client), messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=12, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content is not None
    auto = client.chat.completions.create(model=_model(client), messages=ASK, tools=[WEATHER], max_tokens=12,
                                          temperature=0)  # noise from a random model: stays content
    assert auto.choices[0].message.content and not auto.choices[0].message.tool_calls


def test_bad_tool_requests_are_400_naming_the_field(server):
    cases = [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ]
    for extra, param in cases:
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                       json={"messages": ASK, "max_tokens": 4, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


def test_auto_parses_what_the_model_writes_streamed_and_not(client):
    """`"auto"` leaves the model free and parses its text with the template's parser (Hermes for
    SmolLM2's template). A random model never writes a call by itself, so a regex makes it write
    one: the server's parsing path is the same either way."""
    regex = (r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
             r'"unit": "[cf]"\}\}\n</tool_call>')
    kwargs = dict(model=_model(client), messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=1.0, seed=2,
                  extra_body={"structured_outputs": {"regex": regex}})
    out = client.chat.completions.create(**kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    _valid_calls(choice.message.tool_calls)
    content, calls, finish, _ = _collect(client.chat.completions.create(**kwargs, stream=True))
    assert (content, finish) == ("Checking.", "tool_calls")
    assert calls == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
