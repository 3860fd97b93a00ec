"""oneDNN linear layers (engine/kernels/onednn_linear.py, engine/models/prepack.py) against
`F.linear` and against the same model run through torch's GEMM.

Greedy tokens against transformers run through the default backend in tests/test_models.py and
tests/test_engine.py; here: the kernel's values, the backend choice and its errors, and that
packing frees the dense projection weights.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.config import EngineConfig
from engine.kernels import onednn_linear
from engine.models.loader import load_hf_config, load_model, resolve_model
from engine.models.prepack import resolve_linear_backend
from tests.checkpoints import make_tiny_checkpoint
from tests.test_models import PagedRunner, random_prompt

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(onednn_linear.unsupported_reason(torch.float32, CPU) is not None,
                                  reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 16, 33, 257])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    x = torch.randn(rows, 80, generator=gen)
    packed = onednn_linear.pack(w)
    torch.testing.assert_close(onednn_linear.linear(x, packed, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    x3 = x.reshape(1, rows, 80)  # leading dimensions are kept
    assert onednn_linear.linear(x3, packed, b).shape == (1, rows, 96)
    assert onednn_linear.linear(x[:0], packed, b).shape == (0, 96)


def test_backend_choice_and_errors():
    assert resolve_linear_backend("torch", torch.float32, CPU)[0] == "torch"
    assert resolve_linear_backend("auto", torch.float16, CPU)[0] == "torch"
    assert resolve_linear_backend("auto", torch.float32, torch.device("cuda"))[0] == "torch"
    with pytest.raises(ValueError, match="linear_backend 'onednn'.*CPU only"):
        resolve_linear_backend("onednn", torch.float32, torch.device("cuda"))
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        resolve_linear_backend("mkl", torch.float32, CPU)
    with pytest.raises(ValueError, match="linear_backend"):
        EngineConfig(linear_backend="mkl")
    if onednn_linear.unsupported_reason(torch.float32, CPU) is None:  # "cpu" where it builds
        assert resolve_linear_backend("auto", torch.float32, CPU)[0] in ("cpu", "onednn")
        assert resolve_linear_backend("onednn", torch.float32, CPU)[0] == "onednn"
    assert resolve_linear_backend("auto", torch.bfloat16, CPU)[0] == "torch"  # asked for only
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        with pytest.raises(ValueError, match="no native bfloat16 matmul"):
            resolve_linear_backend("onednn", torch.bfloat16, CPU)


@needs_onednn
@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("gpt2", True), ("qwen2", False)])
def test_packed_model_matches_torch_gemm_and_frees_dense_weights(tmp_path, arch, tied):
    path = make_tiny_checkpoint(str(tmp_path / arch), arch, with_tokenizer=False, tie_word_embeddings=tied)
    src = resolve_model(path)
    cfg = load_hf_config(src)
    dense = load_model(src, cfg, torch.float32, "cpu", linear_backend="torch")
    packed = load_model(src, cfg, torch.float32, "cpu", linear_backend="onednn")
    assert packed.packed_lm_head is not None and dense.packed_lm_head is None
    projections = [m for m in packed.modules() if hasattr(m, "packed") and isinstance(m, torch.nn.Linear)]
    assert projections and all(m.packed is not None and m.weight.is_meta for m in projections)
    # the tied head's matrix is the embedding, which the lookup still reads; an untied head is
    # kept dense only for the greedy head's recompute (engine/models/greedy_head.py)
    keeps_dense = tied or packed.greedy_head is not None
    assert packed.lm_head_weight().is_meta != keeps_dense
    gen = torch.Generator().manual_seed(0)
    prompts = [random_prompt(n, gen) for n in (5, 19, 33)]
    for prompt_id, prompt in enumerate(prompts):
        feeds = [(str(prompt_id), prompt)]
        want = PagedRunner(dense).step(feeds)[0]
        got = PagedRunner(packed).step(feeds)[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
