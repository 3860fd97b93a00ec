"""Loading: path resolution, sharded safetensors, reduced precision, dummy weights, the real
SmolLM2 GGUF against transformers, and clear errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from engine.models.default_model import DEFAULT_GGUF_FILE
from engine.models.loader import (
    ModelSource, load_hf_config, load_model, load_tokenizer, resolve_dtype, resolve_model,
)
from engine.models.registry import ARCHITECTURES
from tests.checkpoints import load_reference, make_tiny_checkpoint, smollm2_tokenizer_dir
from tests.test_models import PagedRunner, hf_logits, random_prompt


def _logits(model, prompt, dtype=torch.float32):
    return PagedRunner(model, dtype).step([("x", prompt)])[0]


# ---- resolve_model -------------------------------------------------------------------------

def test_resolve_default_is_the_smollm2_gguf():
    src = resolve_model(None)
    assert src.gguf_file == DEFAULT_GGUF_FILE
    assert os.path.isfile(os.path.join(src.path, src.gguf_file))


def test_resolve_checkpoint_dir_and_gguf_paths(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "ckpt")) == ModelSource(str(tmp_path / "ckpt"), None)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"")
    assert resolve_model(str(tmp_path / "g")) == ModelSource(str(tmp_path / "g"), "m.gguf")
    assert resolve_model(str(tmp_path / "g" / "m.gguf")) == ModelSource(str(tmp_path / "g"), "m.gguf")


def test_resolve_errors_name_the_model(tmp_path):
    with pytest.raises(ValueError, match="model .*does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="neither a config.json nor a .gguf"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several .gguf files"):
        resolve_model(str(tmp_path))


# ---- safetensors checkpoints ---------------------------------------------------------------

def test_sharded_checkpoint_loads_identically(tmp_path):
    whole = make_tiny_checkpoint(str(tmp_path / "whole"), "qwen2")
    sharded = make_tiny_checkpoint(str(tmp_path / "sharded"), "qwen2", max_shard_size="200KB")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    cfg = load_hf_config(resolve_model(whole))
    # linear_backend "torch": the dense weights stay (oneDNN packing drops them) to be compared
    a = load_model(resolve_model(whole), cfg, torch.float32, "cpu", linear_backend="torch")
    b = load_model(resolve_model(sharded), cfg, torch.float32, "cpu", linear_backend="torch")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    prompt = random_prompt(21, torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(b, prompt), hf_logits(load_reference(whole), prompt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("gpt2", torch.bfloat16), ("qwen3", torch.float16)])
def test_reduced_precision_is_close_to_float32_reference(tmp_path, arch, dtype):
    path = make_tiny_checkpoint(str(tmp_path), arch)
    ref = load_reference(path)
    model = load_model(resolve_model(path), ref.config, dtype, "cpu")
    assert all(p.dtype == dtype for p in model.parameters())
    prompt = random_prompt(30, torch.Generator().manual_seed(0))
    got, want = _logits(model, prompt, dtype), hf_logits(ref, prompt)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # Loose: the tiny random models use large weights, which amplify rounding.
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.98
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def test_missing_weight_is_reported_by_name(tmp_path):
    path = make_tiny_checkpoint(str(tmp_path), "llama")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(resolve_model(path), load_hf_config(resolve_model(path)), torch.float32, "cpu")


def test_tokenizer_of_checkpoint_has_chat_template(tmp_path):
    path = make_tiny_checkpoint(str(tmp_path), "llama")
    tok = load_tokenizer(resolve_model(path))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in text


# ---- dummy weights and bad arguments -------------------------------------------------------

def _llama32_like() -> LlamaConfig:
    # Llama-3.2-1B's structure (GQA, tied embeddings, llama3 rope) at a reduced size.
    return LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=1024, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )


def test_dummy_weights_need_no_files_and_follow_the_seed(tmp_path):
    src, cfg = ModelSource(str(tmp_path)), _llama32_like()
    a, b, c = (load_model(src, cfg, torch.float32, "cpu", load_format="dummy", seed=s, linear_backend="torch")
               for s in (1, 1, 2))
    w = "model.layers.0.self_attn.qkv_proj.weight"
    params_a, params_b, params_c = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(params_a[n], params_b[n]) for n in params_a)
    assert not torch.equal(params_a[w], params_c[w])
    assert abs(params_a[w].std().item() - 0.02) < 0.002
    assert a.max_model_len == 131072
    assert (a.kv_spec.num_layers, a.kv_spec.num_kv_heads, a.kv_spec.head_dim) == (2, 2, 16)
    logits = _logits(a, random_prompt(10, torch.Generator().manual_seed(0), vocab=1024))
    assert logits.shape == (10, 1024) and torch.isfinite(logits).all()


def test_resolve_dtype(monkeypatch):
    import engine.startup as startup

    cfg = LlamaConfig(dtype="float16")
    assert resolve_dtype("auto", cfg, "cuda") == torch.float16
    assert resolve_dtype("auto", LlamaConfig(), "cuda") == torch.bfloat16  # names none (GGUF)
    assert resolve_dtype("auto", LlamaConfig(dtype="float32"), "cpu") == torch.float32
    assert resolve_dtype("float32", cfg, "cpu") == torch.float32
    assert resolve_dtype("bfloat16", LlamaConfig(dtype="float32"), "cpu") == torch.bfloat16  # explicit wins
    # half-precision checkpoints on CPU: bf16 only where the CPU has fast bf16 kernels
    monkeypatch.setattr(startup, "cpu_has_fast_bf16", lambda: (True, "test: fast"))
    assert resolve_dtype("auto", cfg, "cpu") == torch.bfloat16  # never fp16 on CPU
    assert resolve_dtype("auto", LlamaConfig(), "cpu") == torch.bfloat16
    monkeypatch.setattr(startup, "cpu_has_fast_bf16", lambda: (False, "test: slow"))
    assert resolve_dtype("auto", cfg, "cpu") == torch.float32
    assert resolve_dtype("auto", LlamaConfig(dtype="bfloat16"), "cpu") == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", cfg, "cpu")


def test_cpu_bf16_detection_follows_the_flags(monkeypatch):
    import engine.startup as startup

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(startup, "cpu_flags", lambda: {"avx2", "avx512f"})
    fast, why = startup.cpu_has_fast_bf16()
    assert not fast and "no native bf16" in why  # plain AVX-512: oneDNN would emulate bf16
    monkeypatch.setattr(startup, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16"})
    fast, why = startup.cpu_has_fast_bf16()
    assert fast and "avx512_bf16" in why


def test_default_threads_one_per_physical_core_less_one():
    import engine.startup as startup

    cores = startup.physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert startup.default_num_threads() == max(1, cores - 1)
    before = torch.get_num_threads()
    try:
        assert startup.configure_threads(None, torch.device("cpu")) == max(1, cores - 1)
        assert startup.configure_threads(1, torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(before)


def test_unknown_architecture_lists_supported(tmp_path):
    cfg = LlamaConfig(architectures=["FooForCausalLM"])
    with pytest.raises(ValueError, match="FooForCausalLM.*supported.*LlamaForCausalLM"):
        load_model(ModelSource(str(tmp_path)), cfg, torch.float32, "cpu", load_format="dummy")
    assert set(ARCHITECTURES) >= {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                  "Qwen3ForCausalLM", "GPT2LMHeadModel"}


def test_bad_load_format_is_named(tmp_path):
    with pytest.raises(ValueError, match="load_format"):
        load_model(ModelSource(str(tmp_path)), _llama32_like(), torch.float32, "cpu", load_format="pt")


# ---- the real GGUF -------------------------------------------------------------------------

def test_smollm2_gguf_matches_transformers(monkeypatch):
    import functools

    import gguf

    # transformers' GGUF loader rebuilds gguf's tensor-name map for every tensor (397 times, ~6
    # CPU-s here); the map is a pure function of (architecture, layer count), so the reference
    # loads the same weights with it built once.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    src = resolve_model(None)
    cfg = load_hf_config(src)
    # The tokenizer comes from the shared helper's copy (already built once per test session).
    tok = load_tokenizer(src, tokenizer=smollm2_tokenizer_dir())
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    assert 20 <= len(ids) <= 40
    ours = load_model(src, cfg, torch.float32, "cpu")
    got = _logits(ours, ids)
    ref = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, config=cfg, dtype=torch.float32)
    want = hf_logits(ref.eval(), ids)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_gguf_config_and_tokenizer_are_converted_once_then_cached(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    from engine.models import loader

    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not read: the conversions below are stand-ins")
    calls = []

    def convert_config():
        calls.append("config")
        return _llama32_like()

    def convert_tokenizer():
        calls.append("tokenizer")
        return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())

    first = loader._via_cache("config", str(gguf), AutoConfig.from_pretrained, convert_config)
    again = loader._via_cache("config", str(gguf), AutoConfig.from_pretrained, convert_config)
    same = lambda a, b: {**a.to_dict(), "_name_or_path": ""} == {**b.to_dict(), "_name_or_path": ""}  # noqa: E731
    assert calls == ["config"] and same(again, first)
    tok = loader._via_cache("tokenizer", str(gguf), AutoTokenizer.from_pretrained, convert_tokenizer)
    cached = loader._via_cache("tokenizer", str(gguf), AutoTokenizer.from_pretrained, convert_tokenizer)
    assert calls == ["config", "tokenizer"]
    text = "Hello, wörld! 1234 <|im_start|>"
    assert cached.encode(text) == tok.encode(text)
    chat = [{"role": "user", "content": "Hi"}]
    assert cached.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    # a changed file is a new cache entry
    before = loader.gguf_cache_dir(str(gguf))
    os.utime(gguf, ns=(1, 1))
    assert loader.gguf_cache_dir(str(gguf)) != before
    # an unwritable cache is skipped, not an error
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", "/proc/conveyor-cannot-write-here")
    assert same(loader._via_cache("config", str(gguf), AutoConfig.from_pretrained, convert_config), first)


def test_gguf_tensor_index_is_parsed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """iter_gguf with a cache folder: the first call parses the file and keeps its tensor index,
    later calls read the tensors through it without GGUFReader, and yield the same tensors as
    the uncached path; another config (its name map differs) parses afresh."""
    import gguf

    from engine.models.gguf_weights import INDEX_FILE, iter_gguf

    cfg = _llama32_like()
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    h, inner = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    tensors = {"token_embd.weight": ((cfg.vocab_size, h), gguf.GGMLQuantizationType.Q8_0),
               "blk.0.attn_q.weight": ((h, h), gguf.GGMLQuantizationType.F16),
               "blk.0.attn_k.weight": ((kv, h), gguf.GGMLQuantizationType.Q8_0),
               "blk.0.ffn_up.weight": ((inner, h), gguf.GGMLQuantizationType.F32),
               "blk.1.attn_norm.weight": ((h,), gguf.GGMLQuantizationType.F32)}
    for name, (shape, qtype) in tensors.items():
        values = rng.standard_normal(shape).astype(np.float32)
        data = gguf.quants.quantize(values, qtype) if qtype != gguf.GGMLQuantizationType.F32 else values
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path, cache = str(tmp_path / "m.gguf"), str(tmp_path / "cache")

    plain = dict(iter_gguf(path, cfg, torch.float32))
    assert len(plain) == len(tensors)
    first = dict(iter_gguf(path, cfg, torch.float32, cache_dir=cache))
    assert os.path.isfile(os.path.join(cache, INDEX_FILE))

    class NoReader:
        def __init__(self, *args, **kwargs):
            raise AssertionError("GGUFReader used despite the cached index")

    monkeypatch.setattr(gguf, "GGUFReader", NoReader)
    again = dict(iter_gguf(path, cfg, torch.float32, cache_dir=cache))
    for got in (first, again):
        assert got.keys() == plain.keys()
        assert all(torch.equal(got[k], plain[k]) for k in plain)
    other = _llama32_like()
    other.num_hidden_layers = 3
    with pytest.raises(AssertionError, match="GGUFReader used"):
        dict(iter_gguf(path, other, torch.float32, cache_dir=cache))
