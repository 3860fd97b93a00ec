"""The production layer through real HTTP: one server with a config file exercising tenants
and keys, token/request/concurrency limits, idempotency keys, the response cache and dedup,
cost attribution and /v1/usage, `auto` routing over two models, and output guardrails.

Model "small" is a tiny random llama checkpoint on the real engine; model "large" is the echo
engine (tests/test_prod_harness.py), whose output is its prompt, so guardrails can be checked
on exact text.
"""
from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from engine.async_engine import AsyncEngine
from server.auth import hash_key
from server.config_file import load_config
from tests.test_prod_harness import ProdServer, echo_engine
from tests.test_server_harness import tiny_config

KEYS = {t: f"sk-{t}-0123456789" for t in ("acme", "ops", "tight", "rpm", "solo", "smallco", "budget", "beta")}
CONFIG = f"""
rate_limit_window_seconds = 86400  # one window for the whole test run: no boundary flakes

[[models]]
name = "small"
price = {{ prompt_per_1k = 0.1, cached_per_1k = 0.05, completion_per_1k = 0.2 }}
[[models]]
name = "large"
version = "2"
price = {{ prompt_per_1k = 1.0, completion_per_1k = 2.0 }}

[routing]
rules = [{{ model = "small", max_prompt_tokens = 20, max_tokens = 16, max_complexity = 0.3 }}]

[cache]
response_cache = true
dedup = true

[guards.pii]
type = "pii"
[guards.no_fruit]
type = "blocklist"
terms = ["forbidden fruit"]
check_input = false
[guards.no_drop]
type = "blocklist"
terms = ["drop table"]

[[tenants]]
name = "acme"
api_key_sha256 = ["{hash_key(KEYS['acme'])}"]
guards = ["pii", "no_fruit", "no_drop"]
[[tenants]]
name = "ops"
api_key_sha256 = ["{hash_key(KEYS['ops'])}"]
admin = true
[[tenants]]
name = "tight"
api_key_sha256 = ["{hash_key(KEYS['tight'])}"]
tokens_per_minute = 200
[[tenants]]
name = "rpm"
api_key_sha256 = ["{hash_key(KEYS['rpm'])}"]
requests_per_minute = 2
[[tenants]]
name = "solo"
api_key_sha256 = ["{hash_key(KEYS['solo'])}"]
max_concurrent = 1
[[tenants]]
name = "smallco"
api_key_sha256 = ["{hash_key(KEYS['smallco'])}"]
models = ["small"]
priority = 3
[[tenants]]
name = "budget"
api_key_sha256 = ["{hash_key(KEYS['budget'])}"]
max_cost_per_request = 0.05
[[tenants]]
name = "beta"
api_key_sha256 = ["{hash_key(KEYS['beta'])}"]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("prod")
    (path / "conveyor.toml").write_text(CONFIG)
    production = load_config(path / "conveyor.toml")
    small = AsyncEngine(tiny_config(str(path / "small")))
    srv = ProdServer(small, production, engines={"large": echo_engine("large")}, admin_key=KEYS["ops"]).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def auth(tenant: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}", **extra}


def complete(http, tenant, prompt, model="large", headers=None, **body):
    return http.post("/v1/completions", headers=auth(tenant, **(headers or {})),
                     json={"model": model, "prompt": prompt, "temperature": 0, **body})


def sse_text(response) -> tuple[str, list[str | None]]:
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return ("".join(c["choices"][0]["text"] for c in chunks if c["choices"]),
            [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]])


def echo_engine_of(server):
    return server.engines[1].engine  # the EchoEngine behind "large"


# ---- tenants and auth ---------------------------------------------------------------------
def test_missing_or_wrong_key_is_401_in_openai_envelope(http):
    r = http.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key" and "API key" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer sk-nope-123456789"})
    assert r.status_code == 401 and "Incorrect API key" in r.json()["error"]["message"]
    assert "sk-nope-123456789" not in r.text  # the key is never echoed whole
    assert http.get("/v1/models").status_code == 401
    assert http.get("/health").status_code == 200  # probes need no key


def test_tenant_sets_salt_priority_and_allowed_models(server, http):
    echo = echo_engine_of(server)
    r = complete(http, "beta", "salted prompt", max_tokens=3)
    assert r.status_code == 200 and r.headers["x-conveyor-model"] == "large"
    assert echo.added[-1][1]["cache_salt"] == "tenant:beta" and echo.added[-1][1]["tenant"] == "beta"
    assert [m["id"] for m in http.get("/v1/models", headers=auth("smallco")).json()["data"]] == ["small"]
    assert [m["id"] for m in http.get("/v1/models", headers=auth("beta")).json()["data"]] == ["small", "large"]
    r = complete(http, "smallco", "hello", model="large", max_tokens=2)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert complete(http, "beta", "hello", model="nope").status_code == 404


def test_tenant_series_only_with_an_admin_key(http):
    complete(http, "beta", "hello metrics", max_tokens=2)
    public = http.get("/metrics").text
    assert "tenant=" not in public and "beta" not in public and "vllm:num_requests_running" in public
    assert http.get("/admin/metrics").status_code == 401
    assert http.get("/admin/metrics", headers=auth("beta")).status_code == 403
    admin = http.get("/admin/metrics", headers=auth("ops"))
    assert admin.status_code == 200 and 'conveyor_tenant_requests_total{model="large",tenant="beta"}' in admin.text
    assert all(m["root"] == m["id"] for m in http.get("/v1/models", headers=auth("beta")).json()["data"])


# ---- rate limits ------------------------------------------------------------------------
def test_token_limit_reserves_then_settles_to_real_usage(http):
    prompt = "count the apples"
    p = http.post("/tokenize", headers=auth("tight"), json={"prompt": prompt}).json()["count"]
    first = complete(http, "tight", prompt, max_tokens=150)  # echo: stops after p tokens
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "200"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 200 - (p + 150)
    used = first.json()["usage"]["total_tokens"]
    assert used == 2 * p
    second = complete(http, "tight", prompt + " again", max_tokens=150)
    p2 = second.json()["usage"]["prompt_tokens"]
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 200 - used - (p2 + 150)
    over = complete(http, "tight", prompt, max_tokens=190)
    assert over.status_code == 429
    assert over.json()["error"]["code"] == "rate_limit_exceeded"
    assert over.json()["error"]["type"] == "rate_limit_error"
    assert int(over.headers["retry-after"]) >= 1
    assert over.headers["x-ratelimit-limit-tokens"] == "200" and "x-ratelimit-reset-tokens" in over.headers


def test_stream_settles_when_client_disconnects(server, http):
    spent_before = server.metric("conveyor_tenant_tokens_total", tenant="tight")
    body = {"model": "large", "prompt": "loop", "max_tokens": 150, "stream": True, "ignore_eos": True,
            "temperature": 0}
    with http.stream("POST", "/v1/completions", headers=auth("tight"), json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one event, then hang up
    deadline = time.monotonic() + 20
    while server.metric("conveyor_tenant_tokens_total", tenant="tight") == spent_before:
        assert time.monotonic() < deadline, "the aborted stream was never settled"
        time.sleep(0.05)
    spent = server.metric("conveyor_tenant_tokens_total", tenant="tight") - spent_before
    assert 0 < spent < 100  # the real usage, not the reservation of prompt + 150


def test_request_limit_429_with_openai_headers(http):
    for i in range(2):
        r = complete(http, "rpm", f"req {i}", max_tokens=2)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-remaining-requests"] == str(1 - i)
    r = complete(http, "rpm", "req 3", max_tokens=2)
    assert r.status_code == 429 and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-limit-requests"] == "2" and "retry-after" in r.headers


def test_concurrency_limit(http):
    body = {"model": "large", "prompt": "slow", "max_tokens": 30, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", headers=auth("solo"), json=body) as running:
        assert running.status_code == 200
        r = complete(http, "solo", "second", max_tokens=2)
        assert r.status_code == 429 and "concurrent" in r.json()["error"]["message"]
        running.read()
    assert complete(http, "solo", "third", max_tokens=2).status_code == 200


# ---- idempotency ------------------------------------------------------------------------
def test_idempotent_retry_replays_json_and_stream(server, http):
    replays = server.metric("conveyor_idempotent_replays_total")
    key = {"Idempotency-Key": "order-17"}
    first = complete(http, "beta", "pay the bill", max_tokens=5, temperature=0.9, headers=key)
    again = complete(http, "beta", "pay the bill", max_tokens=5, temperature=0.9, headers=key)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert float(first.headers["x-conveyor-cost"]) > 0 and again.headers["x-conveyor-cost"] == "0"
    assert again.json() == first.json()
    skey = {"Idempotency-Key": "order-18"}
    s1 = complete(http, "beta", "pay the bill", max_tokens=5, temperature=0.9, stream=True, headers=skey)
    s2 = complete(http, "beta", "pay the bill", max_tokens=5, temperature=0.9, stream=True, headers=skey)
    assert s2.headers["content-type"].startswith("text/event-stream")
    assert s2.headers["idempotent-replayed"] == "true" and s2.text == s1.text
    # another tenant's identical key is a different record
    other = complete(http, "acme", "pay the bill", max_tokens=5, temperature=0.9, headers=key)
    assert "idempotent-replayed" not in other.headers
    assert server.metric("conveyor_idempotent_replays_total") == replays + 2


def test_idempotency_conflict_409_and_mismatch_422(http):
    key = {"Idempotency-Key": "slow-1"}
    body = dict(max_tokens=40, ignore_eos=True, headers=key)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(complete, http, "beta", "long task", **body)
        time.sleep(0.15)
        clash = complete(http, "beta", "long task", **body)
        assert clash.status_code == 409 and clash.json()["error"]["code"] == "idempotency_key_in_use"
        assert first.result().status_code == 200
    wrong = complete(http, "beta", "another body", **body)
    assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "Idempotency-Key"
    bad = complete(http, "beta", "x", headers={"Idempotency-Key": "k" * 300})
    assert bad.status_code == 400


# ---- cache and dedup --------------------------------------------------------------------
def test_response_cache_answers_repeats_per_tenant(server, http):
    echo = echo_engine_of(server)
    hits = server.metric("conveyor_cache_hits_total", kind="response")
    first = complete(http, "beta", "cache me please", max_tokens=4)
    runs = len(echo.added)
    second = complete(http, "beta", "cache me please", max_tokens=4)
    assert second.headers["x-conveyor-cache"] == "hit" and second.json() == first.json()
    assert second.headers["x-conveyor-cost"] == "0"
    assert len(echo.added) == runs  # the engine never saw the repeat
    other = complete(http, "acme", "cache me please", max_tokens=4)
    assert "x-conveyor-cache" not in other.headers and len(echo.added) == runs + 1
    sampled = complete(http, "beta", "cache me please", max_tokens=4, temperature=0.7)
    assert "x-conveyor-cache" not in sampled.headers  # not deterministic: never cached
    assert server.metric("conveyor_cache_hits_total", kind="response") == hits + 1


def test_identical_concurrent_requests_share_one_generation(server, http):
    echo = echo_engine_of(server)
    runs = len(echo.added)
    dedup = server.metric("conveyor_cache_hits_total", kind="dedup")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: complete(http, "beta", "shared work", max_tokens=25,
                                                   ignore_eos=True, seed=7), range(3)))
    assert all(r.status_code == 200 for r in results)
    assert len({json.dumps(r.json()["choices"]) for r in results}) == 1
    assert len(echo.added) == runs + 1
    assert server.metric("conveyor_cache_hits_total", kind="dedup") == dedup + 2
    assert sum(r.headers.get("x-conveyor-dedup") == "hit" for r in results) == 2


# ---- cost attribution -------------------------------------------------------------------
def test_cost_header_usage_records_and_rollup(server, http):
    r = complete(http, "acme", "price check", model="small", max_tokens=4, ignore_eos=True,
                 headers={"X-User-Id": "u-42", "X-Feature-Id": "search"})
    u = r.json()["usage"]
    cached = u["prompt_tokens_details"]["cached_tokens"]
    expected = ((u["prompt_tokens"] - cached) * 0.1 + cached * 0.05 + u["completion_tokens"] * 0.2) / 1000
    assert float(r.headers["x-conveyor-cost"]) == pytest.approx(expected, abs=1e-8)
    complete(http, "acme", "more", model="large", max_tokens=2, user="u-43", metadata={"feature": "chat"})
    assert http.get("/v1/usage", headers=auth("acme")).status_code == 403
    assert http.get("/v1/usage").status_code == 401
    by_user = {row["user"]: row for row in http.get(
        "/v1/usage", params={"group_by": "user"}, headers=auth("ops")).json()["data"]}
    assert by_user["u-42"]["cost"] == pytest.approx(expected, abs=1e-8)
    assert by_user["u-42"]["completion_tokens"] == 4 and by_user["u-43"]["requests"] == 1
    features = {row["feature"] for row in http.get(
        "/v1/usage", params={"group_by": "feature"}, headers=auth("ops")).json()["data"]}
    assert {"search", "chat"} <= features
    future = http.get("/v1/usage", params={"group_by": "tenant", "start": time.time() + 60},
                      headers=auth("ops")).json()
    assert future["data"] == []
    bad = http.get("/v1/usage", params={"group_by": "colour"}, headers=auth("ops"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
    assert server.metric("conveyor_tenant_cost_dollars_total", tenant="acme", model="small") >= expected


# ---- routing ------------------------------------------------------------------------------
def test_auto_routes_small_requests_small_and_heavy_ones_large(server, http):
    small = complete(http, "beta", "Hi there", model="auto", max_tokens=4)
    assert small.json()["model"] == "small" and small.headers["x-conveyor-model"] == "small"
    heavy_prompt = "Prove step by step that the algorithm terminates, and analyze its cost. " * 2
    heavy = complete(http, "beta", heavy_prompt, model="auto", max_tokens=50)
    assert heavy.json()["model"] == "large" and heavy.headers["x-conveyor-route"] == "default"
    long_max = complete(http, "beta", "Hi there", model="auto", max_tokens=40)
    assert long_max.json()["model"] == "large"
    capped = complete(http, "budget", heavy_prompt, model="auto", max_tokens=50)
    assert capped.json()["model"] == "small" and capped.headers["x-conveyor-route"] == "cost ceiling"
    assert server.metric("conveyor_routed_requests_total", model="small", reason="cost ceiling") >= 1


# ---- guardrails -------------------------------------------------------------------------
PII_PROMPT = "Mail john.doe@example.com or call 555-123-4567, card 4111 1111 1111 1111 ok"
REDACTED = "Mail [EMAIL] or call [PHONE], card [CREDIT_CARD] ok"


def test_pii_is_redacted_in_json_and_streams(server, http):
    r = complete(http, "acme", PII_PROMPT, max_tokens=100)
    assert r.json()["choices"][0]["text"] == REDACTED
    s = complete(http, "acme", PII_PROMPT, max_tokens=100, stream=True, temperature=0.5)
    text, _ = sse_text(s)
    assert text == REDACTED
    assert complete(http, "beta", PII_PROMPT, max_tokens=100).json()["choices"][0]["text"] == PII_PROMPT
    assert server.metric("conveyor_guard_actions_total", guard="pii", action="redact_output") >= 6
    leak = complete(http, "acme", PII_PROMPT, max_tokens=5, logprobs=1)  # raw tokens would leak
    assert leak.status_code == 400 and leak.json()["error"]["param"] == "logprobs"


def test_blocklist_stops_output_with_content_filter(server, http):
    prompt = "I would like the forbidden fruit today"
    r = complete(http, "acme", prompt, max_tokens=100)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["text"] == "I would like the "
    s = complete(http, "acme", prompt, max_tokens=100, stream=True, temperature=0.5)
    text, reasons = sse_text(s)
    assert text == "I would like the " and reasons[-1] == "content_filter"
    refused = complete(http, "acme", "please DROP TABLE users", max_tokens=5)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "content_filter"
    assert server.metric("conveyor_guard_actions_total", guard="no_fruit", action="block_output") >= 2
    assert server.metric("conveyor_guard_actions_total", guard="no_drop", action="block_input") == 1


def test_chat_stream_on_the_real_engine_is_replayed_by_key(http):
    body = {"model": "small", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4,
            "stream": True, "temperature": 0.8, "ignore_eos": True}
    headers = auth("beta", **{"Idempotency-Key": "chat-1"})
    first = http.post("/v1/chat/completions", json=body, headers=headers)
    again = http.post("/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.text == first.text
    chunks = [json.loads(line[6:]) for line in first.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert {c["model"] for c in chunks} == {"small"} and chunks[-1]["choices"][0]["finish_reason"] == "length"
