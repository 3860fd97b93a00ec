"""Per-model truth with two served models, each on its own tiny engine: `/tokenize` answers the
named model's context length, and `/metrics` has every engine series once per model (label
`model_name`), with each model's queue depth and KV usage its own."""
from __future__ import annotations

import dataclasses
import time

import httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.outputs import EngineStats
from server.config_file import config_from_dict
from server.metrics import ServerMetrics
from tests.test_prod_harness import ProdServer
from tests.test_server_harness import tiny_config

LEN = {"a": 256, "b": 128}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("two")
    config = tiny_config(str(path), max_model_len=LEN["a"], num_blocks=512)  # one checkpoint, two engines
    a = AsyncEngine(config)
    b = AsyncEngine(dataclasses.replace(config, max_model_len=LEN["b"], num_blocks=64))
    production = config_from_dict({"models": [{"name": "a"}, {"name": "b"}]})
    srv = ProdServer(a, production, engines={"b": b}).start()
    yield srv
    srv.stop()


def samples(server, name: str) -> dict[str, float]:
    """{model_name: value} of one metric."""
    out = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            model = labels.split('model_name="', 1)[1].split('"', 1)[0]
            out[model] = float(value)
    return out


def test_tokenize_answers_the_named_models_context(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        for model, length in LEN.items():
            r = c.post("/tokenize", json={"model": model, "prompt": "Hello world"})
            assert r.status_code == 200 and r.json()["max_model_len"] == length
        assert c.post("/tokenize", json={"prompt": "Hello"}).json()["max_model_len"] == LEN["a"]  # the default
        models = c.get("/v1/models").json()["data"]
        assert {m["id"]: m["max_model_len"] for m in models} == LEN
        assert all(m["root"] == m["id"] for m in models)  # never a filesystem path


def test_metrics_follow_each_models_own_engine(server):
    info = [line for line in httpx.get(server.base_url + "/metrics").text.splitlines()
            if line.startswith("vllm:cache_config_info{")]
    assert len(info) == 2 and any('num_gpu_blocks="64"' in i and 'model_name="b"' in i for i in info)
    body = {"model": "b", "prompt": "tell me a story", "max_tokens": 100, "stream": True, "ignore_eos": True}
    seen_running, seen_usage, other = 0.0, 0.0, []
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            while True:  # scrape while b generates
                running, usage = samples(server, "vllm:num_requests_running"), samples(server, "vllm:kv_cache_usage_perc")
                seen_running, seen_usage = max(seen_running, running["b"]), max(seen_usage, usage["b"])
                other.append((running["a"], usage["a"], samples(server, "vllm:num_requests_waiting")["a"]))
                if seen_running and seen_usage:
                    break
            rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert seen_running == 1 and seen_usage > 0
    assert set(other) == {(0.0, 0.0, 0.0)}  # the idle model stays idle
    assert samples(server, "vllm:generation_tokens_total")["b"] >= 100
    steps = samples(server, "conveyor_step_time_seconds_count")
    assert steps["b"] > 0
    generated_a = samples(server, "vllm:generation_tokens_total")["a"]
    r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                   json={"model": "a", "prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200
    assert samples(server, "vllm:generation_tokens_total")["a"] == generated_a + 3
    deadline = time.monotonic() + 10
    while samples(server, "vllm:kv_cache_usage_perc")["b"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert samples(server, "vllm:kv_cache_usage_perc") == {"a": 0.0, "b": 0.0}


def test_engine_gauges_render_one_sample_per_model():
    metrics = ServerMetrics()
    stats = {"small": EngineStats(num_running=3, num_waiting=5, kv_cache_usage=0.25),
             "large": EngineStats(num_running=1, num_waiting=0, kv_cache_usage=0.75)}
    for name in stats:
        metrics.for_model(lambda name=name: name, lambda name=name: stats[name])
    text = metrics.render().decode()
    for gauge, field in (("vllm:num_requests_running", "num_running"), ("vllm:num_requests_waiting", "num_waiting"),
                         ("vllm:kv_cache_usage_perc", "kv_cache_usage")):
        for name, s in stats.items():
            assert f'{gauge}{{model_name="{name}"}} {float(getattr(s, field))}' in text


def test_models_share_a_tokenizer_only_when_it_tokenizes_alike():
    from unittest import mock

    from server.served_models import ModelHandle
    from tests.test_prod_harness import smollm2_tokenizer

    def handle(tokenizer):
        return ModelHandle(None, mock.Mock(tokenizer=tokenizer), mock.Mock(), mock.Mock())

    small, large = handle(smollm2_tokenizer()), handle(smollm2_tokenizer())  # two loads, one tokenizer
    assert small.shares_tokenizer(large)  # `auto` routing tokenizes the prompt once
    other = smollm2_tokenizer()
    other.chat_template = "{{ messages[0]['content'] }}"
    assert not small.shares_tokenizer(handle(other)) and not small.shares_tokenizer(handle(None))
