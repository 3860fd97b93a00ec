"""The model's generation_config supplies defaults for the sampling fields a request leaves
unset; fields the request sets win; `generation_config="none"` ignores the file."""
from __future__ import annotations

import json
import os

import pytest
import torch

from engine.config import EngineConfig
from engine.generation_config import GenerationDefaults, load_generation_defaults
from engine.llm_engine import LLMEngine
from engine.models.default_model import DEFAULT_SAMPLING
from engine.models.loader import ModelSource, resolve_model
from engine.sampling_params import SamplingParams
from tests.checkpoints import load_reference, make_tiny_checkpoint

PROMPT = [1, 504, 3458, 282, 4649, 314]  # arbitrary ids
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("genconf"))
    make_tiny_checkpoint(path, "llama")
    with open(os.path.join(path, "generation_config.json")) as f:
        data = json.load(f)  # keep what transformers wrote (token ids), add sampling defaults
    data.update({"temperature": 0.0, "top_p": 0.5, "do_sample": True, "max_new_tokens": 3})
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(data, f)
    return path


def engine_for(path: str, mode: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, dtype="float32", device="cpu", num_blocks=64, block_size=16,
                                  max_model_len=128, attention_backend="torch", generation_config=mode))


def run(engine: LLMEngine, params: SamplingParams) -> list[int]:
    engine.add_request("r", PROMPT, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return out.outputs[0].token_ids
    raise AssertionError("no output")


def reference_greedy(path: str) -> list[int]:
    model = load_reference(path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(PROMPT):].tolist()


def test_unset_temperature_takes_the_file_default_and_is_greedy(checkpoint):
    engine = engine_for(checkpoint, "auto")
    assert engine.sampling_defaults.values == {"temperature": 0.0, "top_p": 0.5}  # not max_new_tokens
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    assert run(engine, params) == reference_greedy(checkpoint)
    assert params.temperature == 1.0  # the caller's object is left alone


def test_set_fields_win_and_none_ignores_the_file(checkpoint):
    vocab = 49152
    auto = load_generation_defaults(ModelSource(checkpoint), "auto")
    # "vllm" means what it means in vLLM: the engine's own defaults, not the model's file
    assert load_generation_defaults(ModelSource(checkpoint), "vllm").values == {}
    explicit = auto.prepare(SamplingParams(temperature=0.7), vocab, EngineConfig())
    assert (explicit.temperature, explicit.top_p) == (0.7, 0.5)
    assert auto.prepare(SamplingParams(top_p=1.0), vocab, EngineConfig()).top_p == 1.0
    assert auto.prepare(None, vocab, EngineConfig()).temperature == 0.0
    none = load_generation_defaults(ModelSource(checkpoint), "none")
    resolved = none.prepare(SamplingParams(), vocab, EngineConfig())
    assert (resolved.temperature, resolved.top_p, resolved.top_k) == (1.0, 1.0, 0)
    # a folder path reads that folder's file
    assert load_generation_defaults(ModelSource("/nonexistent"), checkpoint).values == auto.values


def test_engine_with_none_samples_at_temperature_one(checkpoint):
    engine = engine_for(checkpoint, "none")
    assert engine.sampling_defaults.values == {}
    params = engine.sampling_defaults.prepare(SamplingParams(), 49152, engine.config)
    assert params.temperature == 1.0 and not params.is_greedy


def test_bad_values_and_modes_are_refused(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="temperature"):
        load_generation_defaults(ModelSource(str(tmp_path)), "auto")
    with pytest.raises(ValueError, match="generation_config must be"):
        load_generation_defaults(ModelSource(str(tmp_path)), "/no/such/folder")
    assert GenerationDefaults().prepare(None, 10, EngineConfig()).temperature == 1.0


def test_default_model_ships_its_defaults():
    defaults = load_generation_defaults(resolve_model(None), "auto")
    assert defaults.values == DEFAULT_SAMPLING
    assert load_generation_defaults(resolve_model(None), "none").values == {}


def test_server_leaves_unset_fields_to_the_model(checkpoint):
    import httpx

    from engine.async_engine import AsyncEngine
    from tests.test_server_harness import ServerThread

    config = EngineConfig(model=checkpoint, dtype="float32", device="cpu", num_blocks=64, block_size=16,
                          max_model_len=128, attention_backend="torch")
    srv = ServerThread(AsyncEngine(config)).start()
    try:
        body = {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "ignore_eos": True}
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            unset = [http.post("/v1/completions", json=body).json() for _ in range(2)]
            greedy = http.post("/v1/completions", json={**body, "temperature": 0}).json()
        texts = {r["choices"][0]["text"] for r in unset}
        assert texts == {greedy["choices"][0]["text"]}  # the file's temperature 0: greedy
    finally:
        srv.stop()


def test_gguf_sampling_metadata_is_read(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "d\u00e9f"])  # skipped on the way
    writer.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    writer.add_float32("general.sampling.temp", 0.25)
    writer.add_float32("general.sampling.top_p", 0.75)
    writer.add_int32("general.sampling.top_k", 40)
    writer.add_float32("general.sampling.penalty_repeat", 1.1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    defaults = load_generation_defaults(ModelSource(str(tmp_path), "m.gguf"), "auto")
    assert defaults.values == pytest.approx({"temperature": 0.25, "top_p": 0.75, "top_k": 40,
                                             "repetition_penalty": 1.1})
    assert isinstance(defaults.values["top_k"], int)
