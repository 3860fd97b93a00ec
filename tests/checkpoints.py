"""Shared test helper: tiny random HF checkpoints that carry the real SmolLM2 tokenizer.

`make_tiny_checkpoint(path, arch)` writes a 2-layer model of the given architecture with
transformers' own classes (so transformers is the reference) plus the SmolLM2 tokenizer and chat
template. Weights are drawn with a large std so greedy decoding does not collapse onto a single
repeated token, which would hide bugs.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile

import torch

from engine.models.default_model import default_gguf_path

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
VOCAB_SIZE = 49152  # SmolLM2's vocabulary, so real tokenizer ids are valid


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer_dir() -> str:
    """Directory holding the SmolLM2 tokenizer (from the default GGUF) in HF format, written
    once per process."""
    from transformers import AutoTokenizer

    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    out = tempfile.mkdtemp(prefix=f"conveyor-tok-{os.getpid()}-")
    tok.save_pretrained(out)
    return out


def _config(arch: str, overrides: dict):
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.5)
    llama_like = dict(
        common, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
    )
    if arch == "llama":
        kwargs, cls = dict(llama_like, tie_word_embeddings=False, rope_theta=10000.0), tf.LlamaConfig
    elif arch == "mistral":
        kwargs, cls = dict(llama_like, sliding_window=None, tie_word_embeddings=False), tf.MistralConfig
    elif arch == "qwen2":
        kwargs, cls = dict(llama_like, tie_word_embeddings=True), tf.Qwen2Config
    elif arch == "qwen3":
        # head_dim 32 differs from hidden / heads = 16 on purpose
        kwargs, cls = dict(llama_like, head_dim=32, tie_word_embeddings=False), tf.Qwen3Config
    elif arch == "gpt2":
        kwargs = dict(common, n_embd=64, n_layer=2, n_head=4, n_positions=2048, initializer_range=0.2)
        cls = tf.GPT2Config
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    kwargs.update(overrides)
    return cls(**kwargs)


def make_tiny_checkpoint(path: str, arch: str = "llama", *, seed: int = 0, max_shard_size: str | None = None,
                         with_tokenizer: bool = True, **overrides) -> str:
    """Writes a tiny random float32 checkpoint of `arch` plus (unless `with_tokenizer` is False)
    the SmolLM2 tokenizer to `path`; `overrides` go to the transformers config. Returns `path`."""
    from transformers import AutoModelForCausalLM

    config = _config(arch, overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # norm scales away from 1 and non-zero biases exercise more code
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    if with_tokenizer:
        shutil.copytree(smollm2_tokenizer_dir(), path, dirs_exist_ok=True)
    return path


def load_reference(path: str, dtype: torch.dtype = torch.float32):
    """The transformers model for a checkpoint directory, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def reference_greedy(path: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (exactly `new_tokens` tokens, an explicit
    attention mask), float32; fails when every continuation repeats one token, since such an
    output would hide bugs."""
    ref = load_reference(path)
    expected = []
    for p in prompts:
        with torch.inference_mode():
            ids = torch.tensor([p])
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)
        expected.append(out[0, len(p):].tolist())
    assert all(len(set(t)) > 1 for t in expected), "degenerate reference output hides bugs"
    return expected
