"""`POST /v1/responses` with the official openai client (`responses.create`, `responses.stream`)
on a tiny random Llama: the same greedy text as the equivalent chat request, typed stream
events with gapless sequence numbers whose deltas add up to the final object, message / function
call / function output input items, `text.format` json_schema (valid JSON, completed), function
tools (forced and named, streamed argument deltas), 400s naming the Responses field, and the
production pipeline (auth, idempotent replay, input guards, usage)."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from engine.async_engine import AsyncEngine
from server.auth import hash_key
from server.config_file import load_config
from tests.test_prod_harness import ProdServer
from tests.test_server_harness import tiny_config

KEYS = {t: f"sk-{t}-0123456789" for t in ("open", "guarded", "ops")}
CONFIG = f"""
rate_limit_window_seconds = 86400

[[models]]
name = "tiny"
price = {{ prompt_per_1k = 1.0, completion_per_1k = 2.0 }}

[guards.no_drop]
type = "blocklist"
terms = ["drop table"]

[[tenants]]
name = "open"
api_key_sha256 = ["{hash_key(KEYS['open'])}"]
[[tenants]]
name = "guarded"
api_key_sha256 = ["{hash_key(KEYS['guarded'])}"]
guards = ["no_drop"]
[[tenants]]
name = "ops"
api_key_sha256 = ["{hash_key(KEYS['ops'])}"]
admin = true
"""
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 5}},
          "required": ["a", "b"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                          "required": ["city"], "additionalProperties": False}}
GREEDY = dict(model="tiny", temperature=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("responses")
    (path / "conveyor.toml").write_text(CONFIG)
    srv = ProdServer(AsyncEngine(tiny_config(str(path / "tiny"))), load_config(path / "conveyor.toml"),
                     admin_key=KEYS["ops"]).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEYS["open"], max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60, headers={"Authorization": f"Bearer {KEYS['open']}"}) as c:
        yield c


def sse(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of each event of a raw stream."""
    out = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines.get("event"), json.loads(lines["data"])))
    return out


def test_create_matches_chat_and_stream_events_add_up(client, http):
    r = client.responses.create(input="Say hi", instructions="Be brief.", max_output_tokens=6, **GREEDY)
    chat = client.chat.completions.create(messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Say hi"}], max_tokens=6, **GREEDY)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # random weights
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, 6)
    assert r.usage.total_tokens == r.usage.input_tokens + 6
    assert r.store is False and r.instructions == "Be brief." and r.max_output_tokens == 6

    raw = http.post("/v1/responses", json={"input": "Say hi", "instructions": "Be brief.", "max_output_tokens": 6,
                                           "stream": True, **GREEDY})
    events = sse(raw)
    assert raw.headers["content-type"].startswith("text/event-stream") and "[DONE]" not in raw.text
    assert all(name == data["type"] for name, data in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    types = [name for name, _ in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    text = "".join(d["delta"] for name, d in events if name == "response.output_text.delta")
    final = events[-1][1]["response"]
    assert text == r.output_text == events[-4][1]["text"] == final["output"][0]["content"][0]["text"]
    assert final["output"][0]["id"] == events[2][1]["item"]["id"] and final["usage"]["output_tokens"] == 6


def test_input_items_round_trip_like_chat(client):
    items = [
        {"role": "developer", "content": "Answer briefly."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                                        {"type": "input_text", "text": "in Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": '{"celsius": 21}'},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It is 21 C."}]},
        {"role": "user", "content": "Thanks!"},
    ]
    r = client.responses.create(input=items, max_output_tokens=5, tools=[WEATHER], tool_choice="none", **GREEDY)
    chat = client.chat.completions.create(messages=[
        {"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
        {"role": "assistant", "content": "It is 21 C."}, {"role": "user", "content": "Thanks!"}],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        tool_choice="none", max_tokens=5, **GREEDY)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_text_format_json_schema_streams_to_completed(client):
    fmt = {"type": "json_schema", "name": "pair", "schema": SCHEMA, "strict": True}
    with client.responses.stream(input="Give me JSON", max_output_tokens=60, text={"format": fmt}, **GREEDY) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert final.status == "completed" and final.text.format.type == "json_schema"
    jsonschema.validate(json.loads(final.output_text), SCHEMA)
    assert "".join(deltas) == final.output_text
    same = client.responses.create(input="Give me JSON", max_output_tokens=60, text={"format": fmt}, **GREEDY)
    assert same.output_text == final.output_text


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_function_tools_create_and_stream(client, choice):
    kwargs = dict(input="What is the weather in Paris?", tools=[WEATHER], tool_choice=choice,
                  parallel_tool_calls=False, max_output_tokens=60, **GREEDY)
    r = client.responses.create(**kwargs)
    assert r.status == "completed" and [o.type for o in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    with client.responses.stream(**kwargs) as s:
        events = list(s)
        final = s.get_final_response()
    types = [e.type for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert args == done.arguments == final.output[0].arguments == call.arguments
    assert final.output[0].id == events[2].item.id


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "background": True}, "background"),
    ({"input": ""}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 10 ** 6}, "max_output_tokens"),
    ({"input": "x " * 400}, "input"),
    ({"input": "x", "temperature": 5}, "temperature"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "t", "schema": {"type": "nope"}}}},
     "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": ""}]}, "tools[0].name"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
])
def test_bad_requests_name_the_responses_field(http, body, param):
    r = http.post("/v1/responses", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and isinstance(r.json()["error"]["code"], str)


def test_store_is_accepted_but_nothing_is_stored(client):
    r = client.responses.create(input="hello", max_output_tokens=2, store=True, metadata={"k": "v"}, **GREEDY)
    assert r.store is False and r.metadata == {"k": "v"}


def test_production_pipeline(server, http):
    body = {"model": "tiny", "input": "Tell me something", "max_output_tokens": 4, "temperature": 0}
    assert httpx.post(server.base_url + "/v1/responses", json=body).status_code == 401
    key = {"Idempotency-Key": "responses-1"}
    first = http.post("/v1/responses", json=body, headers=key)
    again = http.post("/v1/responses", json=body, headers=key)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()
    # the same key on the chat endpoint is another request body: refused, not replayed
    chat = http.post("/v1/chat/completions", headers=key, json={"model": "tiny", "max_tokens": 4, "temperature": 0,
                                                                "messages": [{"role": "user", "content": "Tell me"}]})
    assert chat.status_code == 422
    guarded = {"Authorization": f"Bearer {KEYS['guarded']}"}
    r = http.post("/v1/responses", headers=guarded, json={**body, "input": "please drop table users"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
    assert float(first.headers["x-conveyor-cost"]) > 0 and first.headers["x-conveyor-model"] == "tiny"
    usage = http.get("/v1/usage", headers={"Authorization": f"Bearer {KEYS['ops']}"}).json()["data"]
    assert next(row for row in usage if row["tenant"] == "open")["completion_tokens"] >= 4
    assert server.metric("conveyor_http_requests_total", route="/v1/responses") >= 3
