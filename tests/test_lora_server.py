"""Multi-LoRA serving through the HTTP server: random PEFT adapters (made with peft) on a tiny
random Llama, served by name in `model` (completions, chat, responses, streamed and not) with
the same tokens as the offline engine; /v1/models parents; load/unload at run time and every
refusal; tenants' allow-lists and `auto` routing; usage records, the trace file and metrics
(`vllm:lora_requests_info` as the Gateway API Inference Extension reads it); start-up flags."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from server.auth import hash_key
from server.config_file import CacheConfig, ProductionConfig, RoutingConfig, TenantConfig, config_from_dict
from tests.test_prod_harness import ProdServer, echo_engine
from tests.test_server_harness import tiny_config

pytest.importorskip("peft")
from tests.test_lora import make_adapter  # noqa: E402 - needs peft

ADMIN, USER = "sk-lora-admin-0001", "sk-lora-user-00001"
PROMPT = [3051, 17, 905, 4400, 21, 8, 1200]  # token ids: no chat template, no tokenizer quirks
MAX_NEW = 8


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from conveyor.serve import _load_adapters

    root = tmp_path_factory.mktemp("lora-server")
    base = str(root / "tiny")
    config = tiny_config(base, enable_lora=True, max_loras=2, max_lora_rank=16, num_threads=1)
    paths = {"sql": make_adapter(base, str(root / "sql"), 8, 16, ["q_proj", "v_proj"], False, seed=1),
             "chat": make_adapter(base, str(root / "chat"), 4, 8, ["o_proj", "down_proj"], False, seed=2),
             "big": make_adapter(base, str(root / "big"), 32, 32, ["q_proj"], False, seed=3)}
    # an adapter naming a module the model lacks, and one trained on another base model
    for name, edit in (("alien", {"target_modules": ["q_proj", "v_proj", "router_proj"]}),
                       ("other", {"base_model_name_or_path": str(root / "otherbase")})):
        shutil.copytree(paths["sql"], root / name)
        cfg_file = root / name / "adapter_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **edit}))
        paths[name] = str(root / name)
    os.makedirs(root / "otherbase")
    (root / "otherbase" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    production = ProductionConfig(
        tenants=[TenantConfig("ops", [hash_key(ADMIN)], admin=True),
                 TenantConfig("acme", [hash_key(USER)], models=["tiny", "sql"])],
        routing=RoutingConfig(default="sql"), cache=CacheConfig(response_cache=True))
    from server.settings import ServerSettings

    trace = str(root / "trace.jsonl")
    server = ProdServer(AsyncEngine(config), production, admin_key=ADMIN,
                        settings=ServerSettings(served_model_name="tiny", trace_file=trace)).start()
    # the start-up adapters go through `conveyor serve`'s own loader
    assert _load_adapters(server.app, [("sql", paths["sql"], None)], {}) is None
    yield server, base, paths, trace
    server.stop()


def _complete(server, model: str, key: str = ADMIN, **extra) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/completions", headers=_auth(key), timeout=60, json={
        "model": model, "prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True, **extra})


def _load(server, body: dict, key: str = ADMIN) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/load_lora_adapter", headers=_auth(key), json=body, timeout=60)


def _unload(server, name: str, key: str = ADMIN) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/unload_lora_adapter", headers=_auth(key), json={"lora_name": name},
                      timeout=60)


def test_adapter_answers_by_name_like_the_offline_engine(env):
    from engine import LLM
    from engine.lora import LoRARequest

    server, base, paths, _ = env
    lora, plain = _complete(server, "sql"), _complete(server, "tiny")
    assert lora.status_code == plain.status_code == 200, lora.text
    assert lora.json()["model"] == "sql" and lora.headers["X-Conveyor-Model"] == "sql"
    assert lora.json()["choices"][0]["text"] != plain.json()["choices"][0]["text"]
    cfg = {k: v for k, v in vars(server.engine.config).items() if k != "model"}
    llm = LLM(base, **cfg)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    offline = llm.generate([PROMPT, PROMPT], params, use_tqdm=False,
                           lora_request=[LoRARequest("sql", 1, paths["sql"]), None])
    assert [o.outputs[0].text for o in offline] == [lora.json()["choices"][0]["text"],
                                                      plain.json()["choices"][0]["text"]]


def test_chat_streamed_and_responses_on_an_adapter(env):
    server = env[0]
    messages = [{"role": "user", "content": "Name a colour."}]
    body = {"model": "sql", "messages": messages, "max_tokens": MAX_NEW, "temperature": 0}
    whole = httpx.post(server.base_url + "/v1/chat/completions", headers=_auth(ADMIN), json=body, timeout=60).json()
    assert whole["model"] == "sql"
    text, models = "", set()
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", headers=_auth(ADMIN), timeout=60,
                      json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                models.add(chunk["model"])
                text += chunk["choices"][0]["delta"].get("content") or ""
    assert models == {"sql"} and text == whole["choices"][0]["message"]["content"]
    resp = httpx.post(server.base_url + "/v1/responses", headers=_auth(ADMIN), timeout=60, json={
        "model": "sql", "input": "Name a colour.", "max_output_tokens": MAX_NEW, "temperature": 0}).json()
    assert resp["model"] == "sql" and resp["output"][0]["content"][0]["text"] == text


def test_embeddings_of_an_adapter_are_peft_models_hidden_states(env):
    import torch
    from peft import PeftModel

    from tests.checkpoints import load_reference

    server, base, paths, _ = env

    def embed(model: str) -> torch.Tensor:
        r = httpx.post(server.base_url + "/v1/embeddings", headers=_auth(ADMIN), timeout=60,
                       json={"model": model, "input": [PROMPT]})
        assert r.status_code == 200 and r.json()["model"] == model, r.text
        return torch.tensor(r.json()["data"][0]["embedding"])

    peft_model = PeftModel.from_pretrained(load_reference(base), paths["sql"]).eval()
    with torch.no_grad():  # the adapted decoder's final (normed) hidden states, mean-pooled
        hidden = peft_model.base_model.model.model(torch.tensor([PROMPT])).last_hidden_state[0]
    ref = torch.nn.functional.normalize(hidden.mean(0), dim=0)
    lora, plain = embed("sql"), embed("tiny")
    assert torch.nn.functional.cosine_similarity(lora, ref, dim=0) > 0.9999
    assert torch.nn.functional.cosine_similarity(plain, ref, dim=0) < 0.999  # the adapter changed it


def test_models_lists_adapters_with_their_parent_per_tenant(env):
    server, _, paths, _ = env
    listed = {m["id"]: m for m in httpx.get(server.base_url + "/v1/models", headers=_auth(ADMIN)).json()["data"]}
    assert listed["tiny"]["parent"] is None
    assert listed["sql"]["parent"] == "tiny" and listed["sql"]["root"] == paths["sql"]


def test_load_and_unload_at_run_time_with_every_refusal(env, tmp_path):
    server, _, paths, _ = env
    shutil.copytree(paths["sql"], tmp_path / "broken")  # adapter_config.json not JSON
    (tmp_path / "broken" / "adapter_config.json").write_text("{" * 3 + "r: 8")
    cases = [({"lora_name": "x"}, "lora_path", None),
             ({"lora_name": 7, "lora_path": paths["sql"]}, "lora_name", "non-empty string"),
             ({"lora_name": "x", "lora_path": str(tmp_path / "broken")}, "lora_path", "adapter_config.json"),
             ({"lora_name": "x", "lora_path": paths["sql"] + "-missing"}, "lora_path", None),
             ({"lora_name": "x", "lora_path": paths["big"]}, "lora_path", "rank"),
             ({"lora_name": "x", "lora_path": paths["alien"]}, "lora_path", "router_proj"),
             ({"lora_name": "x", "lora_path": paths["other"]}, "lora_path", "base_model_name_or_path"),
             ({"lora_name": "sql", "lora_path": paths["chat"]}, "lora_name", "already served"),
             ({"lora_name": "tiny", "lora_path": paths["chat"]}, "lora_name", "already served"),
             ({"lora_name": "a,b", "lora_path": paths["chat"]}, "lora_name", "commas"),
             ({"lora_name": "x", "lora_path": paths["chat"], "base_model_name": "nope"}, "base_model_name", None)]
    for body, param, words in cases:
        r = _load(server, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        assert words is None or words in r.json()["error"]["message"], r.text
    assert _complete(server, "x").status_code == 404  # nothing half-loaded
    assert _load(server, {"lora_name": "chat", "lora_path": paths["chat"]}, key=USER).status_code == 403
    assert httpx.post(server.base_url + "/v1/load_lora_adapter", json={}).status_code == 401

    r = _load(server, {"lora_name": "chat", "lora_path": paths["chat"]})
    assert r.status_code == 200 and "chat" in r.text
    first = _complete(server, "chat")
    assert first.status_code == 200 and first.json()["model"] == "chat"
    r = _unload(server, "chat")
    assert r.status_code == 200, r.text
    gone = _complete(server, "chat")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    r = _unload(server, "chat")
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
    # the name reloaded from another folder is another adapter, for the engine and the response cache
    assert _load(server, {"lora_name": "chat", "lora_path": paths["sql"]}).status_code == 200
    swapped = _complete(server, "chat")
    assert "X-Conveyor-Cache" not in swapped.headers
    assert swapped.json()["choices"] == _complete(server, "sql").json()["choices"] != first.json()["choices"]
    assert _unload(server, "chat").status_code == 200
    assert _load(server, {"lora_name": "chat", "lora_path": paths["chat"]}).status_code == 200
    assert _complete(server, "chat").json()["choices"] == first.json()["choices"]


def test_tenant_allow_list_and_auto_routing_treat_adapters_as_models(env):
    server, *_ = env
    assert _complete(server, "sql", key=USER).status_code == 200
    r = _complete(server, "chat", key=USER)
    if r.status_code == 404:  # run alone: `chat` was never loaded
        assert _load(server, {"lora_name": "chat", "lora_path": env[2]["chat"]}).status_code == 200
        r = _complete(server, "chat", key=USER)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    seen = {m["id"] for m in httpx.get(server.base_url + "/v1/models", headers=_auth(USER)).json()["data"]}
    assert seen == {"tiny", "sql"}
    auto = _complete(server, "auto", key=USER)
    assert auto.status_code == 200 and auto.headers["X-Conveyor-Model"] == "sql"


def test_usage_records_trace_file_and_metrics_carry_the_adapter(env):
    server, _, _, trace = env
    assert _complete(server, "sql").status_code == 200
    records = httpx.get(server.base_url + "/v1/usage?group_by=model", headers=_auth(ADMIN)).json()["data"]
    assert any(r["model"] == "sql" and r["requests"] >= 1 for r in records), records
    lines = [json.loads(x) for x in open(trace).read().splitlines()]
    assert any(x["model"] == "sql" and x["base_model"] == "tiny" for x in lines)
    assert server.metric("conveyor_lora_requests_total", model_name="tiny", lora_name="sql") >= 1
    assert server.metric("conveyor_lora_tokens_total", lora_name="sql", kind="generation") >= MAX_NEW

    # while a long request runs on `sql`, the GIE gauge names it as running
    def long_request() -> None:
        _complete(server, "sql", max_tokens=160)

    worker = threading.Thread(target=long_request)
    worker.start()
    deadline, line = time.monotonic() + 30, None
    while time.monotonic() < deadline and line is None:
        text = httpx.get(server.base_url + "/metrics").text
        line = next((x for x in text.splitlines() if x.startswith("vllm:lora_requests_info{")
                     and 'running_lora_adapters="sql"' in x), None)
    worker.join()
    assert line is not None
    assert 'max_lora="2"' in line and 'waiting_lora_adapters=""' in line
    assert abs(float(line.rsplit(" ", 1)[1]) - time.time()) < 60  # the last update time, unix seconds


def test_a_server_without_lora_refuses_the_routes_and_exports_no_lora_metrics():
    server = ProdServer(echo_engine(), ProductionConfig()).start()
    try:
        r = httpx.post(server.base_url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/a"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "lora_not_enabled"
        text = httpx.get(server.base_url + "/metrics").text
        assert "vllm:lora_requests_info" not in text and "conveyor_lora_" not in text
    finally:
        server.stop()


def test_flags_and_config_file_set_lora(tmp_path):
    from conveyor.cli import build_parser
    from conveyor.serve import _adapters_to_load, _lora
    from server.lora_modules import engine_overrides

    args = build_parser().parse_args([
        "serve", "--lora-modules", "a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}',
        "--max-loras", "4"])
    production = config_from_dict({"lora": {"max_lora_rank": 8, "lora_modules": [{"name": "c", "path": "/z"}]}})
    lora = _lora(args, production)
    assert engine_overrides(lora) == {"enable_lora": True, "max_loras": 4, "max_lora_rank": 8}
    assert _adapters_to_load(production, lora) == [("c", "/z", None), ("a", "/x", None), ("b", "/y", "m")]
    assert EngineConfig(**engine_overrides(lora)).max_loras == 4
    multi = config_from_dict({"models": [{"name": "m", "lora": {"lora_modules": [{"name": "d", "path": "/d"}]}}]})
    assert _adapters_to_load(multi, _lora(build_parser().parse_args(["serve"]), multi)) == [("d", "/d", "m")]
    for bad in (["serve", "--lora-modules", "nopath"], ["serve", "--max-loras", "2"]):
        with pytest.raises(ValueError, match="lora"):
            _lora(build_parser().parse_args(bad), ProductionConfig())
    with pytest.raises(ValueError, match="enable_lora"):
        _lora(build_parser().parse_args(["serve"]), config_from_dict({"lora": {"max_loras": 2}}))
    with pytest.raises(ValueError, match="models"):
        _lora(build_parser().parse_args(["serve", "--enable-lora"]), multi)
    with pytest.raises(ValueError, match="enable_lora"):
        config_from_dict({"models": [{"name": "m", "lora": {"max_loras": 2}}]})
    with pytest.raises(ValueError, match="unique"):
        config_from_dict({"models": [{"name": "m", "lora": {"lora_modules": [{"name": "m", "path": "/d"}]}}]})


def test_a_bad_start_up_adapter_is_the_reason_serve_fails(env):
    from conveyor.serve import _load_adapters

    server, _, paths, _ = env
    reason = _load_adapters(server.app, [("huge", paths["big"], None)], {})
    assert reason is not None and "huge" in reason and "rank" in reason


def test_lora_info_gauge_one_sample_per_label_set_updated_on_change():
    from prometheus_client import CollectorRegistry, generate_latest

    from engine.outputs import EngineStats
    from server.lora_metrics import LoRAMetrics

    stats = {"a": EngineStats(running_lora_adapters=["sql", "chat"], waiting_lora_adapters=["x"], max_loras=2),
             "b": EngineStats()}  # LoRA stats not reported: max_lora from the config, empty lists
    metrics = LoRAMetrics(CollectorRegistry())
    metrics.watch(lambda: stats["a"], 2)
    metrics.watch(lambda: stats["b"], 3)
    metrics.watch(lambda: stats["b"], 3)  # the same label set twice: one sample

    def samples() -> dict[str, float]:
        lines = generate_latest(metrics.registry).decode().splitlines()
        return {k: float(v) for k, _, v in (x.rpartition(" ") for x in lines if x.startswith("vllm:lora_requests_info{"))}

    first = samples()
    assert set(first) == {
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql,chat",waiting_lora_adapters="x"}',
        'vllm:lora_requests_info{max_lora="3",running_lora_adapters="",waiting_lora_adapters=""}'}
    assert all(abs(v - time.time()) < 60 for v in first.values())
    time.sleep(0.01)
    assert samples() == first  # nothing changed: same update times
    stats["a"] = EngineStats(running_lora_adapters=["sql"], max_loras=2)
    changed = samples()
    key = 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql",waiting_lora_adapters=""}'
    assert changed[key] > max(first.values())
