"""The cpu GEMM linear backend (engine/kernels/cpu_gemm.py, csrc/cpu_gemm.cpp,
engine/models/prepack.py): values against `F.linear`, rows bit-identical whatever the batch,
bias, leading dimensions, a whole model against torch's GEMM, the backend choice and its errors,
the fallback when the C++ extension is unavailable; exact 16-bit (bf16/fp16) weight panels:
bit-identical to float32 panels, chosen only where exact, a bf16 checkpoint's greedy tokens
equal to transformers'; gate_up with SiLU-and-mul fused into the epilogue: bit-identical to the
GEMM followed by silu_and_mul, and used by the model's MLP.

Tolerance: float32, the kernel sums in k order with FMAs, BLAS in blocks; with inputs ~N(0, 1)
and weights ~N(0, 1/K) outputs are O(1) and agree to atol 1e-4, rtol 1e-4.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.kernels import cpu_gemm, onednn_linear, ops
from engine.models import prepack
from engine.models.loader import load_hf_config, load_model, resolve_model
from engine.models.prepack import resolve_linear_backend
from tests.checkpoints import make_tiny_checkpoint, reference_greedy
from tests.test_engine import random_prompts
from tests.test_models import PagedRunner, random_prompt

CPU = torch.device("cpu")
needs_cpu_gemm = pytest.mark.skipif(cpu_gemm.unsupported_reason(torch.float32, CPU) is not None,
                                    reason="cpu GEMM not built on this host (no compiler or no AVX2 + FMA)")


def _data(n, k, m, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    return w, torch.randn(n, generator=gen), torch.randn(m, k, generator=gen)


@needs_cpu_gemm
@pytest.mark.parametrize("n,k", [(16, 8), (1000, 101), (7, 33), (96, 1), (200, 1536)])
def test_values_match_f_linear(n, k):
    w, b, x = _data(n, k, 2048, n + k)
    packed = cpu_gemm.pack(w)
    assert packed.panels.shape == ((n + 15) // 16, k, 16) and packed.out_features == n
    for m in (*range(1, 71), 2048):
        for bias in (None, b):
            got = cpu_gemm.linear(x[:m], packed, bias)
            torch.testing.assert_close(got, F.linear(x[:m], w, bias), atol=1e-4, rtol=1e-4)
    assert cpu_gemm.linear(x[:0], packed, b).shape == (0, n)


@needs_cpu_gemm
def test_bias_added_after_the_chain_and_leading_dims_kept():
    w, b, x = _data(40, 24, 9, 1)
    packed = cpu_gemm.pack(w)
    # one float32 add of the bias to the bias-free result: bit-identical
    assert torch.equal(cpu_gemm.linear(x, packed, b), cpu_gemm.linear(x, packed, None) + b)
    x3 = x.reshape(3, 3, 24)
    got = cpu_gemm.linear(x3, packed, b)
    assert got.shape == (3, 3, 40) and torch.equal(got.reshape(9, 40), cpu_gemm.linear(x, packed, b))
    # a non-contiguous input gives the same result as its contiguous copy
    xt = torch.randn(24, 9).t()
    assert torch.equal(cpu_gemm.linear(xt, packed, b), cpu_gemm.linear(xt.contiguous(), packed, b))


@needs_cpu_gemm
@pytest.mark.parametrize("block_rows", [64, 5])
def test_row_bits_do_not_depend_on_the_batch(block_rows):
    w, b, x = _data(1000, 131, 300, 2)
    packed = cpu_gemm.pack(w)
    full = cpu_gemm.linear(x, packed, b, block_rows)
    for row in (0, 7, 150, 299):
        alone = cpu_gemm.linear(x[row:row + 1], packed, b, block_rows)
        assert torch.equal(alone[0], full[row])
        for m in (2, 5, 6, 7, 13, 32, 64, 65, 129):  # the row at every position of batches of many sizes
            start = max(0, min(row - m // 2, 300 - m))
            got = cpu_gemm.linear(x[start:start + m], packed, b, block_rows)
            assert torch.equal(got[row - start], full[row]), (row, m)
    assert torch.equal(cpu_gemm.linear(x, packed, b, 64), cpu_gemm.linear(x, packed, b, 5))


@needs_cpu_gemm
def test_backend_choice_and_errors():
    assert resolve_linear_backend("cpu", torch.float32, CPU)[0] == "cpu"
    # auto takes it where it was measured faster: AVX2 hosts (oneDNN's AVX-512 kernels elsewhere)
    avx2 = torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert resolve_linear_backend("auto", torch.float32, CPU)[0] == ("cpu" if avx2 else "onednn")
    assert resolve_linear_backend("onednn", torch.float32, CPU)[0] == "onednn"
    assert resolve_linear_backend("auto", torch.bfloat16, CPU)[0] == "torch"
    with pytest.raises(ValueError, match="linear_backend 'cpu'.*float32 only"):
        resolve_linear_backend("cpu", torch.bfloat16, CPU)
    with pytest.raises(ValueError, match="linear_backend 'cpu'.*CPU only"):
        resolve_linear_backend("cpu", torch.float32, torch.device("cuda"))
    with pytest.raises(ValueError, match="linear_backend must be one of auto, cpu, onednn, torch"):
        resolve_linear_backend("avx", torch.float32, CPU)


def test_falls_back_when_the_extension_is_unavailable(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "cpu_ops_available", lambda: False)
    assert "could not be built" in cpu_gemm.unsupported_reason(torch.float32, CPU)
    with pytest.raises(ValueError, match="linear_backend 'cpu' is not available.*could not be built"):
        resolve_linear_backend("cpu", torch.float32, CPU)
    with pytest.raises(RuntimeError, match="cpu GEMM unavailable"):
        cpu_gemm.pack(torch.zeros(4, 4))
    want = "onednn" if onednn_linear.unsupported_reason(torch.float32, CPU) is None else "torch"
    assert resolve_linear_backend("auto", torch.float32, CPU)[0] == want


@needs_cpu_gemm
@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_model_matches_torch_gemm(tmp_path, arch, tied):
    path = make_tiny_checkpoint(str(tmp_path / arch), arch, with_tokenizer=False, tie_word_embeddings=tied)
    src = resolve_model(path)
    cfg = load_hf_config(src)
    dense = load_model(src, cfg, torch.float32, "cpu", linear_backend="torch")
    packed = load_model(src, cfg, torch.float32, "cpu", linear_backend="cpu")
    assert packed.linear_backend == "cpu" and packed.packed_lm_head is not None  # head stays on oneDNN
    projections = [m for m in packed.modules() if isinstance(m, prepack.PackableLinear)]
    assert projections and all(isinstance(m.packed, cpu_gemm.CpuPackedWeight) and m.weight.is_meta
                               for m in projections)
    gen = torch.Generator().manual_seed(0)
    for prompt_id, n in enumerate((5, 19, 33)):
        feeds = [(str(prompt_id), random_prompt(n, gen))]
        want = PagedRunner(dense).step(feeds)[0]
        got = PagedRunner(packed).step(feeds)[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def _rounded(n, k, seed, dtype):
    """Weights exactly representable in `dtype` (as loaded from a checkpoint stored in it)."""
    w, b, _ = _data(n, k, 1, seed)
    return w.to(dtype).float(), b


@needs_cpu_gemm
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(16, 8), (1000, 101), (7, 33), (40, 1), (200, 1536)])
def test_16bit_panels_are_bit_identical_to_float32_panels(storage, n, k):
    w, b = _rounded(n, k, n * k, storage)
    wide, narrow = cpu_gemm.pack(w, torch.float32), cpu_gemm.pack(w, storage)
    assert narrow.panels.dtype == storage and narrow.nbytes * 2 == wide.nbytes
    gen = torch.Generator().manual_seed(k)
    for m in (1, 5, 32, 100):
        x = torch.randn(m, k, generator=gen)
        for bias in (None, b):
            got = cpu_gemm.linear(x, narrow, bias)
            assert torch.equal(got, cpu_gemm.linear(x, wide, bias)), (m, bias is None)
    x3 = torch.randn(4, 25, k, generator=gen)
    assert torch.equal(cpu_gemm.linear(x3, narrow, b), cpu_gemm.linear(x3, wide, b))
    torch.testing.assert_close(cpu_gemm.linear(x3, narrow, b), F.linear(x3, w, b), atol=1e-4, rtol=1e-4)


@needs_cpu_gemm
def test_storage_is_the_narrowest_exact_one():
    bf16, _ = _rounded(33, 20, 0, torch.bfloat16)
    fp16, _ = _rounded(33, 20, 0, torch.float16)
    assert not cpu_gemm.exact_in(fp16, torch.bfloat16)  # fp16 keeps mantissa bits bf16 lacks
    assert cpu_gemm.pack(bf16).panels.dtype == torch.bfloat16
    assert cpu_gemm.pack(fp16).panels.dtype == torch.float16
    assert cpu_gemm.pack(_data(33, 20, 1, 0)[0]).panels.dtype == torch.float32  # not exact in either
    big = bf16.clone()
    big[3, 4] = 2.0 ** 20  # exact in bf16, out of float16's range
    assert cpu_gemm.pack(big).panels.dtype == torch.bfloat16 and not cpu_gemm.exact_in(big, torch.float16)
    nan = bf16.clone()
    nan[0, 0] = float("nan")  # never "exact": kept in float32
    assert cpu_gemm.pack(nan).panels.dtype == torch.float32
    with pytest.raises(ValueError, match="storage torch.float16 does not hold"):
        cpu_gemm.pack(big, torch.float16)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> str:
    """A tiny llama checkpoint stored in bfloat16 (with the tokenizer), as most checkpoints are."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("bf16") / "llama"), "llama")
    AutoModelForCausalLM.from_pretrained(path).to(torch.bfloat16).save_pretrained(path)  # overwrites the weights
    return path


@needs_cpu_gemm
def test_bf16_checkpoint_packs_bf16_panels_with_float32_panel_bits(bf16_checkpoint, monkeypatch):
    """A bf16 checkpoint loaded in float32: every projection gets bf16 panels, and the model's
    logits are bit-identical to float32 panels (and close to torch's GEMM, same argmax)."""
    src = resolve_model(bf16_checkpoint)
    cfg = load_hf_config(src)
    narrow = load_model(src, cfg, torch.float32, "cpu", linear_backend="cpu")
    dense = load_model(src, cfg, torch.float32, "cpu", linear_backend="torch")
    monkeypatch.setattr(cpu_gemm, "STORAGE_DTYPES", (torch.float32,))
    wide = load_model(src, cfg, torch.float32, "cpu", linear_backend="cpu")
    kinds = {m.packed.panels.dtype for m in narrow.modules() if isinstance(m, prepack.PackableLinear)}
    assert kinds == {torch.bfloat16}
    assert {m.packed.panels.dtype for m in wide.modules() if isinstance(m, prepack.PackableLinear)} == {torch.float32}
    gen = torch.Generator().manual_seed(0)
    for prompt_id, n in enumerate((5, 33)):
        feeds = [(str(prompt_id), random_prompt(n, gen))]
        got = PagedRunner(narrow).step(feeds)[0]
        assert torch.equal(got, PagedRunner(wide).step(feeds)[0])
        want = PagedRunner(dense).step(feeds)[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@needs_cpu_gemm
def test_bf16_checkpoint_greedy_matches_transformers(bf16_checkpoint):
    llm = LLM(bf16_checkpoint, dtype="float32", linear_backend="cpu", num_blocks=128)
    assert {m.packed.panels.dtype for m in llm.engine.model.modules()
            if isinstance(m, prepack.PackableLinear)} == {torch.bfloat16}
    prompts = random_prompts(4, seed=5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == reference_greedy(bf16_checkpoint, prompts, 8)


# ---- gate_up with SiLU-and-mul in the GEMM's epilogue (csrc/cpu_gemm_gate_up.cpp) ----------

@needs_cpu_gemm
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inner,k", [(1536, 512), (40, 33), (7, 5), (16, 8), (25, 1)])
def test_fused_silu_epilogue_is_bit_identical_to_gemm_then_silu_and_mul(storage, inner, k):
    """pack_gate_up panels: `linear` gives the bits of `pack` panels, `silu_and_mul_linear` those
    of ops.silu_and_mul on them, for M = 1, odd M, M not a multiple of the 6-row tile or of the
    row block, inner not a multiple of 16, with a bias driving gates to exp's overflow,
    underflow and zero."""
    w, b = _rounded(2 * inner, k, inner + k, storage)
    b[:4] = torch.tensor([-100.0, 100.0, -89.0, 0.0])  # gate biases; with zero weights the gates are these
    w[:4] = 0.0
    plain, fused = cpu_gemm.pack(w, storage), cpu_gemm.pack_gate_up(w, storage)
    assert fused.gate_up and fused.panels.dtype == storage and fused.panels.shape == (2 * ((inner + 15) // 16), k, 16)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(300, k, generator=gen) * 4
    for m in (1, 2, 5, 6, 7, 13, 64, 65, 129, 300):
        for bias in (None, b):
            for block_rows in (64, 5):
                h = cpu_gemm.linear(x[:m], plain, bias, block_rows)
                assert torch.equal(cpu_gemm.linear(x[:m], fused, bias, block_rows), h), (m, block_rows)
                got = cpu_gemm.silu_and_mul_linear(x[:m], fused, bias, block_rows)
                assert torch.equal(got, ops.silu_and_mul(h)), (m, bias is None, block_rows)
    assert cpu_gemm.silu_and_mul_linear(x[:0], fused, b).shape == (0, inner)


@needs_cpu_gemm
def test_fused_silu_epilogue_leading_dims_and_errors():
    w, b = _rounded(2 * 24, 20, 3, torch.bfloat16)
    fused = cpu_gemm.pack_gate_up(w)
    x3 = torch.randn(3, 5, 20)
    got = cpu_gemm.silu_and_mul_linear(x3, fused, b)
    assert got.shape == (3, 5, 24) and torch.equal(got.reshape(15, 24), cpu_gemm.silu_and_mul_linear(x3.reshape(15, 20), fused, b))
    torch.testing.assert_close(got, ops.silu_and_mul_torch(F.linear(x3, w, b)), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="packed by pack_gate_up"):
        cpu_gemm.silu_and_mul_linear(x3, cpu_gemm.pack(w), b)
    with pytest.raises(ValueError, match=r"\[2 \* inner, in\]"):
        cpu_gemm.pack_gate_up(w[:47])


@needs_cpu_gemm
def test_model_mlp_uses_the_fused_epilogue_with_unfused_bits(tmp_path, monkeypatch):
    """A tiny Llama on the cpu backend: gate_up panels are interleaved, the MLP never calls
    silu_and_mul, and its logits are bit-identical to the unfused path (GEMM, then silu_and_mul)."""
    from engine.models import parallel_linear

    path = make_tiny_checkpoint(str(tmp_path / "llama"), "llama", with_tokenizer=False, intermediate_size=200)
    src = resolve_model(path)
    model = load_model(src, load_hf_config(src), torch.float32, "cpu", linear_backend="cpu")
    gate_ups = [m for m in model.modules() if isinstance(m, parallel_linear.GateUpLinear)]
    assert gate_ups and all(m.packed.gate_up for m in gate_ups)
    gen = torch.Generator().manual_seed(0)
    feeds = [(str(i), random_prompt(n, gen)) for i, n in enumerate((1, 19, 33))]
    with monkeypatch.context() as m:
        m.setattr(parallel_linear, "silu_and_mul", lambda h: pytest.fail("the unfused path ran"))
        fused = [PagedRunner(model).step([feed])[0] for feed in feeds]
    monkeypatch.setattr(parallel_linear.GateUpLinear, "FUSED_MIN_ROWS", 1 << 30)
    for feed, got in zip(feeds, fused):
        assert torch.equal(got, PagedRunner(model).step([feed])[0])
