"""Embeddings: the engine's pooled final hidden states against transformers' on the same tiny
checkpoint (cosine >= 0.9999), under chunked prefill, preemption, prefix caching and mixed in
one batch with generation requests (whose tokens must not change); then `POST /v1/embeddings`
through the official openai client and the production pipeline (tenants, allow-lists, rate
limits, input guards, usage)."""
from __future__ import annotations

import base64
import struct

import httpx
import numpy as np
import openai
import pytest
import torch

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.pooling import PoolingParams
from server.auth import hash_key
from server.config_file import load_config
from tests.checkpoints import make_tiny_checkpoint
from tests.test_prod_harness import ProdServer
from tests.test_server_harness import tiny_config


TEXTS = ["Hello world",
         "The quick brown fox jumps over the lazy dog, again and again, until the dog finally wakes up.",
         "A third, medium-sized sentence about embeddings."]
COSINE = 0.9999


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("embed")), "llama")


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    # a 16-token budget: the longer texts are prefilled in several chunks
    return LLM(checkpoint, dtype="float32", device="cpu", num_blocks=64, attention_backend="torch",
               max_num_batched_tokens=16)


def reference(hf, ids: list[int], pooling: str = "mean") -> torch.Tensor:
    """transformers' final (normed) hidden states, pooled and L2-normalized."""
    with torch.no_grad():
        h = hf.base_model(torch.tensor([ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(h.mean(0) if pooling == "mean" else h[-1], dim=0)


def assert_close(vector, ref: torch.Tensor) -> None:
    v = torch.as_tensor(np.asarray(vector, dtype=np.float32))
    assert v.shape == ref.shape
    assert abs(float(v.norm()) - 1.0) < 1e-4  # normalized
    assert torch.nn.functional.cosine_similarity(v, ref, dim=0).item() >= COSINE


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embed_matches_transformers_under_chunked_prefill(llm, hf, pooling):
    tok = llm.get_tokenizer()
    ids = [tok.encode(t) for t in TEXTS]
    assert max(len(i) for i in ids) > 16  # at least one text is chunked
    for vector, i in zip(llm.embed(TEXTS, pooling=pooling), ids):
        assert_close(vector, reference(hf, i, pooling))
    assert llm.engine.kv.is_idle()


def test_mean_pooling_ignores_prefix_cache_and_last_pooling_uses_it(llm, hf):
    tok = llm.get_tokenizer()
    shared = "Shared prefix that fills more than one whole KV block of sixteen tokens for sure, " * 2
    texts = [shared + "first tail.", shared + "second tail."]
    ids = [tok.encode(t) for t in texts]
    for pooling in ("mean", "last"):
        hits = llm.engine.kv.prefix_cache_hits
        for vector, i in zip(llm.embed(texts, pooling=pooling), ids):
            assert_close(vector, reference(hf, i, pooling))
        gained = llm.engine.kv.prefix_cache_hits - hits
        assert (gained == 0) if pooling == "mean" else (gained > 0), (pooling, gained)


def test_embedding_mixed_with_generation_leaves_generation_unchanged(llm, hf):
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["Once upon a time", "The capital of France is"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    engine, kinds = llm.engine, []
    execute = engine.runner.execute

    def spy(out):  # records, per step, whether it mixed pooling and generation sequences
        kinds.append({s.pooling is not None for s in out.scheduled})
        return execute(out)

    engine.runner.execute = spy
    try:
        engine.add_request("gen-0", prompts[0], params)
        engine.step()  # generation under way, then embeddings join it
        engine.add_request("emb-0", TEXTS[1], PoolingParams())
        engine.add_request("gen-1", prompts[1], params)
        engine.add_request("emb-1", TEXTS[2], PoolingParams(pooling="last"))
        final = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
    finally:
        engine.runner.execute = execute
    assert {True, False} in kinds  # some step held both kinds
    assert [final["gen-0"].outputs[0].token_ids, final["gen-1"].outputs[0].token_ids] == alone
    assert final["emb-0"].outputs[0].token_ids == [] and final["emb-0"].outputs[0].finish_reason == "stop"
    assert_close(final["emb-0"].embedding, reference(hf, tok.encode(TEXTS[1])))
    assert_close(final["emb-1"].embedding, reference(hf, tok.encode(TEXTS[2]), "last"))
    assert final["gen-0"].embedding is None


def test_preempted_embedding_recomputes_from_scratch(llm, hf):
    engine = llm.engine
    update = engine.scheduler.update_from_output
    preempted = []

    def preempt_once(out, sampled):  # after the first chunk, preempt as the scheduler would
        finished = update(out, sampled)
        req = engine.scheduler.requests.get("emb-p")
        if req is not None and not preempted:
            engine.scheduler._preempt(req)
            preempted.append(req.request_id)
        return finished

    engine.scheduler.update_from_output = preempt_once
    try:
        engine.add_request("emb-p", TEXTS[1], PoolingParams())
        final = None
        while engine.has_unfinished_requests():
            final = next((o for o in engine.step() if o.finished), final)
    finally:
        engine.scheduler.update_from_output = update
    assert preempted and final.num_preemptions == 1
    assert_close(final.embedding, reference(hf, llm.get_tokenizer().encode(TEXTS[1])))


def test_embedding_requests_are_validated(llm):
    with pytest.raises(ValueError, match="pooling"):
        PoolingParams(pooling="max")
    with pytest.raises(ValueError, match="maximum context length"):
        llm.engine.add_request("too-long", list(range(5000)), PoolingParams())
    with pytest.raises(ValueError, match="empty"):
        llm.engine.add_request("empty", [], PoolingParams())
    assert not llm.engine.has_unfinished_requests()


# ---- the HTTP endpoint ---------------------------------------------------------------------
KEYS = {t: f"sk-{t}-0123456789" for t in ("open", "guarded", "tight", "locked", "ops")}
CONFIG = f"""
rate_limit_window_seconds = 86400

[[models]]
name = "small"
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
name = "tight"
api_key_sha256 = ["{hash_key(KEYS['tight'])}"]
tokens_per_minute = 30
[[tenants]]
name = "locked"
api_key_sha256 = ["{hash_key(KEYS['locked'])}"]
models = ["other"]
[[tenants]]
name = "ops"
api_key_sha256 = ["{hash_key(KEYS['ops'])}"]
admin = true
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    path = tmp_path_factory.mktemp("prod")
    (path / "conveyor.toml").write_text(CONFIG)
    engine = AsyncEngine(tiny_config(checkpoint, max_num_batched_tokens=16))
    srv = ProdServer(engine, load_config(path / "conveyor.toml"), admin_key=KEYS["ops"]).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def client(server, tenant: str = "open") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def test_openai_client_embeddings_match_transformers(server, http, hf, llm):
    c = client(server)
    # the client asks for base64 by default and decodes it; then floats explicitly
    for fmt in (None, "float"):
        kwargs = {"encoding_format": fmt} if fmt else {}
        res = c.embeddings.create(model="small", input=TEXTS, **kwargs)
        assert res.object == "list" and res.model == "small" and [d.index for d in res.data] == [0, 1, 2]
        ids = [llm.get_tokenizer().encode(t) for t in TEXTS]
        for d, i in zip(res.data, ids):
            assert d.object == "embedding"
            assert_close(d.embedding, reference(hf, i))
        assert res.usage.prompt_tokens == res.usage.total_tokens == sum(len(i) for i in ids)
    one = c.embeddings.create(model="small", input="Hello world", encoding_format="float")
    assert len(one.data) == 1 and np.allclose(one.data[0].embedding, res.data[0].embedding, atol=1e-5)


def test_token_id_inputs_base64_and_last_pooling(http, hf):
    ids = [[1, 500, 600, 700], [42, 43]]
    r = http.post("/v1/embeddings", headers=auth("open"),
                  json={"input": ids, "encoding_format": "base64", "pooling": "last"})
    assert r.status_code == 200, r.text
    for d, i in zip(r.json()["data"], ids):
        raw = base64.b64decode(d["embedding"])
        assert_close(struct.unpack(f"<{len(raw) // 4}f", raw), reference(hf, i, "last"))
    r = http.post("/v1/embeddings", headers=auth("open"), json={"input": ids[0], "dimensions": 64})
    assert r.status_code == 200 and len(r.json()["data"]) == 1 and r.json()["usage"]["prompt_tokens"] == 4
    assert r.headers["x-conveyor-model"] == "small" and float(r.headers["x-conveyor-cost"]) == pytest.approx(0.004)


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "dimensions": 8}, "dimensions"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input[1]"),
    ({"input": [[1, 2], "x", 3]}, "input[2]"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "hi", "pooling": "max"}, "pooling"),
    ({"input": [[1, 10 ** 6]]}, "input"),
    ({"input": ["ok", [5] * 300]}, "input[1]"),
    ({"input": "hi", "model": 3}, "model"),
])
def test_bad_requests_name_the_field(http, body, param):
    r = http.post("/v1/embeddings", headers=auth("open"), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and isinstance(r.json()["error"]["code"], str)


def test_production_pipeline_auth_allow_list_guards_limits_usage(server, http):
    assert http.post("/v1/embeddings", json={"input": "hi"}).status_code == 401
    r = http.post("/v1/embeddings", headers=auth("locked"), json={"input": "hi", "model": "small"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    r = http.post("/v1/embeddings", headers=auth("guarded"), json={"input": ["fine", "please DROP TABLE users"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
    assert http.post("/v1/embeddings", headers=auth("guarded"), json={"input": "fine"}).status_code == 200
    # 30 tokens a minute: 20 fit, the next 20 do not
    r = http.post("/v1/embeddings", headers=auth("tight"), json={"input": [list(range(1, 21))]})
    assert r.status_code == 200 and "x-ratelimit-remaining-tokens" in r.headers
    r = http.post("/v1/embeddings", headers=auth("tight"), json={"input": [list(range(1, 21))]})
    assert r.status_code == 429
    usage = http.get("/v1/usage", headers=auth("ops"), params={"group_by": "tenant"}).json()["data"]
    tight = next(row for row in usage if row["tenant"] == "tight")
    assert tight["prompt_tokens"] == 20 and tight["completion_tokens"] == 0 and tight["requests"] == 1
    assert server.metric("conveyor_http_requests_total", route="/v1/embeddings") >= 5
