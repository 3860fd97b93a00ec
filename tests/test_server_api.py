"""The server with the official `openai` client and plain HTTP: completions and chat, streaming
and not, usage, stop strings, n>1, logprobs, the side routes, request ids and OpenAPI."""
from __future__ import annotations

import httpx
import openai
import pytest
from openapi_spec_validator import validate

from tests.test_server_harness import TINY_MAX_MODEL_LEN, start_tiny_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_tiny_server(tmp_path_factory.mktemp("tiny"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


def test_models_lists_served_model_with_context(client):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].max_model_len == TINY_MAX_MODEL_LEN


def test_completion_matches_stream_and_usage(client, http):
    model = client.models.list().data[0].id
    full = client.completions.create(model=model, prompt="The cat sat on", max_tokens=6, **GREEDY)
    assert full.object == "text_completion" and full.model == model
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert full.usage.completion_tokens == 6
    assert full.usage.prompt_tokens == http.post("/tokenize", json={"prompt": "The cat sat on"}).json()["count"]
    assert full.usage.total_tokens == full.usage.prompt_tokens + 6

    chunks = list(client.completions.create(model=model, prompt="The cat sat on", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_completion_stream_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                          max_tokens=5, **GREEDY)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 5
    stream = list(client.chat.completions.create(model=full.model, messages=messages, max_tokens=5,
                                                 stream=True, **GREEDY))
    assert stream[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in stream[1:])
    assert "".join(c.choices[0].delta.content or "" for c in stream) == full.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_text_before_it(client):
    model = client.models.list().data[0].id
    base = client.completions.create(model=model, prompt="Once upon", max_tokens=8, **GREEDY).choices[0].text
    # a stop string taken from the middle of the greedy continuation
    stop = base[len(base) // 2: len(base) // 2 + 3]
    assert stop.strip(), base
    out = client.completions.create(model=model, prompt="Once upon", max_tokens=8, stop=[stop], **GREEDY)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == base[: base.index(stop)]
    assert stop not in out.choices[0].text


def test_n_choices_are_indexed_and_seeded(client):
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt="Colours:", max_tokens=4, n=3, temperature=1.0,
                                    seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 12
    again = client.completions.create(model=model, prompt="Colours:", max_tokens=4, n=3, temperature=1.0,
                                      seed=7, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, n=2, stream=True, **GREEDY))
    by_index = {}
    for c in chunks:
        for ch in c.choices:
            by_index.setdefault(ch.index, []).append(ch)
    assert sorted(by_index) == [0, 1]
    assert all(chs[0].delta.role == "assistant" and chs[-1].finish_reason == "length" for chs in by_index.values())


def test_completion_logprobs_legacy_format(client):
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt="Hello", max_tokens=4, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert max(top.values()) == pytest.approx(chosen)  # greedy: the chosen token is the best


def test_chat_logprobs_content_format(client):
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                         logprobs=True, top_logprobs=2, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 3
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
        assert len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob


def test_tokenize_detokenize_round_trip(http):
    ids = http.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == TINY_MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "Hello world"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 3  # the template adds role markers


def test_health_version_and_request_ids(http, server):
    r = http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "models": [{"name": r.json()["models"][0]["name"], "state": "ready"}]}
    assert http.get("/ready").json() == {"status": "ready", "reasons": []}
    assert r.headers["x-request-id"]
    assert http.get("/version").json()["version"]
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                  headers={"X-Request-Id": "my-request-42"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "my-request-42"
    assert r.json()["id"] == "cmpl-my-request-42"
    assert int(r.headers["x-conveyor-prompt-tokens"]) == r.json()["usage"]["prompt_tokens"]
    assert int(r.headers["x-conveyor-generated-tokens"]) == r.json()["usage"]["completion_tokens"]
    assert float(r.headers["x-conveyor-time-to-first-token"]) >= float(r.headers["x-conveyor-queue-time"]) >= 0
    # a header that is not a sane id is replaced, not echoed
    r = http.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces" and len(r.headers["x-request-id"]) == 32


def test_request_id_in_log_lines(http, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="conveyor"):
        http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-Id": "log-me-7"})
        http.post("/v1/completions", json={"prompt": 5}, headers={"X-Request-Id": "log-me-8"})
    lines = [r.getMessage() for r in caplog.records]
    assert sum("log-me-7" in line for line in lines) >= 2  # the request line and the access line
    assert any("log-me-8" in line and "400" in line for line in lines)


def test_metrics_names_after_requests(server, client):
    model = client.models.list().data[0].id
    client.completions.create(model=model, prompt="count me", max_tokens=3, **GREEDY)
    m = server.metrics()
    names = {k.split("{")[0] for k in m}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 "vllm:cache_config_info", "conveyor_generation_tokens_per_second",
                 "conveyor_batch_size_bucket", "conveyor_step_time_seconds_bucket"):
        assert name in names, name
    assert server.metric("vllm:generation_tokens_total") >= 3
    assert m[f'vllm:request_success_total{{finished_reason="length",model_name="{model}"}}'] >= 1
    assert server.metric("vllm:e2e_request_latency_seconds_count") >= 1
    info = [k for k in m if k.startswith("vllm:cache_config_info")][0]
    assert 'block_size="16"' in info and 'num_gpu_blocks="512"' in info
    import torch

    from engine.models.prepack import resolve_linear_backend

    linear = resolve_linear_backend("auto", torch.float32, torch.device("cpu"))[0]  # onednn on x86 torch builds
    run = [k for k in m if k.startswith("conveyor_model_config_info")][0]
    assert 'dtype="float32"' in run and f'linear_backend="{linear}"' in run
    assert 'attention_backend="torch"' in run  # the tiny server's flag (tests/test_server_harness.py)


def test_openapi_validates_and_docs_are_local(http):
    spec = http.get("/openapi.json").json()
    validate(spec)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
                 "/health", "/version", "/metrics"):
        assert path in spec["paths"]
    page = http.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert "/static/swagger-ui/swagger-ui-bundle.js" in page.text  # Swagger UI, served locally
    js = http.get("/static/api-docs.js")
    assert js.status_code == 200 and "/openapi.json" in js.text
    assert http.get("/static/swagger-ui/swagger-ui-bundle.js").status_code == 200
