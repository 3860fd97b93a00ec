"""engine/kernels/q4_linear.py: the linear kernel straight from GGUF Q4_1 blocks.

Dequantization must be bit-equal to gguf's; the kernel must match F.linear on the dequantized
weight within the float32 bound 2 γ_K Σ|x W| (module doc), be bit-identical to the float32 GEMM
and to its own portable form, and give each row the same bits whatever rows share the call.
"""
from __future__ import annotations

import gguf
import pytest
import torch
import torch.nn.functional as F

from benchmarks.q4_linear_ab import random_q4_1  # the benchmark's weights: one generator for both
from engine.kernels import cpu_gemm, q4_linear

pytestmark = pytest.mark.skipif(q4_linear.unsupported_reason(torch.device("cpu")) is not None,
                                reason=f"{q4_linear.unsupported_reason(torch.device('cpu'))}")

U = 2.0 ** -24  # float32 unit roundoff


@pytest.fixture(scope="module")
def weights() -> dict:
    """(n, k) -> (raw bytes, dequantized float32, Q4Weight) for every shape the tests use."""
    gen = torch.Generator().manual_seed(13)
    out = {}
    for n in (8, 13, 576, 960):
        for k in (32, 576, 1536):
            raw = random_q4_1(n, k, gen)
            out[n, k] = raw, q4_linear.dequantize_q4_1(raw), q4_linear.pack_q4_1(raw)
    return out


@pytest.mark.parametrize("n,k", [(8, 32), (13, 576), (960, 1536), (576, 576)])
def test_dequantize_bit_equal_to_gguf(weights, n, k):
    raw, w, _ = weights[n, k]
    ref = torch.from_numpy(gguf.dequantize(raw.numpy(), gguf.GGMLQuantizationType.Q4_1))
    assert w.dtype == torch.float32 and w.shape == (n, k)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("n", [8, 13, 576, 960])
@pytest.mark.parametrize("k", [32, 576, 1536])
def test_matches_f_linear_within_bound(weights, n, k):
    _, w, packed = weights[n, k]
    gen = torch.Generator().manual_seed(n * 7 + k)
    f32 = cpu_gemm.pack(w, torch.float32)
    for m in (0, 1, 2, 3, 5, 8, 16, 33):
        x = torch.randn(m, k, generator=gen)
        y = q4_linear.linear(x, packed)
        assert y.shape == (m, n) and y.dtype == torch.float32
        ref = F.linear(x, w)
        # both are float32 sums of K products: each within γ_K Σ|x W| of the exact value
        gamma = k * U / (1 - k * U)
        bound = 2 * gamma * (x.abs().double() @ w.abs().double().T)
        assert ((y.double() - ref.double()).abs() <= bound).all(), (m, n, k)
        torch.testing.assert_close(y, ref, rtol=0, atol=float(bound.max()) if m else 0.0)
        # the same FMA chain as the float32 GEMM and the portable form: the same bits
        assert torch.equal(y, cpu_gemm.linear(x, f32, None))
        if m in (1, 3, 8):  # the scalar form is slow: one row of each fused tile shape, one buffered
            assert torch.equal(y, torch.ops.conveyor_cpu.q4_1_linear_reference(x, packed.packed, n, k))


@pytest.mark.parametrize("threads", [1, 2])
def test_row_bits_independent_of_batch(weights, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, k in ((960, 576), (13, 1536), (576, 576)):
            _, _, packed = weights[n, k]
            x = torch.randn(13, k, generator=torch.Generator().manual_seed(k))
            batch = q4_linear.linear(x, packed)
            for i in range(13):
                assert torch.equal(q4_linear.linear(x[i:i + 1], packed)[0], batch[i]), (n, k, i)
            for lo, hi in ((0, 2), (3, 7), (5, 13)):  # every fused and buffered row count
                assert torch.equal(q4_linear.linear(x[lo:hi], packed), batch[lo:hi]), (n, k, lo, hi)
    finally:
        torch.set_num_threads(before)


def test_bias_noncontiguous_and_leading_dims(weights):
    _, w, packed = weights[576, 576]
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(576, generator=gen)
    x = torch.randn(576, 10, generator=gen).T  # [10, 576], not contiguous
    assert not x.is_contiguous()
    y = q4_linear.linear(x, packed, bias)
    assert torch.equal(y, cpu_gemm.linear(x.contiguous(), cpu_gemm.pack(w, torch.float32), bias))
    torch.testing.assert_close(y, F.linear(x, w, bias), rtol=0, atol=1e-4)
    x3 = torch.randn(2, 3, 576, generator=gen)
    flat = q4_linear.linear(x3.reshape(6, 576), packed, bias)
    assert torch.equal(q4_linear.linear(x3, packed, bias), flat.reshape(2, 3, 576))


def test_weight_metadata(weights):
    raw, _, packed = weights[13, 576]
    assert (packed.out_features, packed.in_features) == (13, 576)
    assert packed.nbytes == 1 * (576 // 32) * 320  # one 16-column panel, 5 bits a weight
    assert packed.nbytes == packed.packed.numel()


@pytest.mark.parametrize("raw,problem", [
    (torch.zeros(4, 30, dtype=torch.uint8), "multiple of 20"),
    (torch.zeros(4, 0, dtype=torch.uint8), "multiple of 20"),
    (torch.zeros(4, 40, dtype=torch.int8), "uint8"),
    (torch.zeros(80, dtype=torch.uint8), "2-D"),
])
def test_bad_raw_raises_value_error(raw, problem):
    with pytest.raises(ValueError, match=problem):
        q4_linear.pack_q4_1(raw)
    with pytest.raises(ValueError, match=problem):
        q4_linear.dequantize_q4_1(raw)


def test_bad_x_raises_value_error(weights):
    _, _, packed = weights[8, 32]
    with pytest.raises(ValueError, match="features"):
        q4_linear.linear(torch.zeros(2, 64), packed)
    with pytest.raises(ValueError, match="float32"):
        q4_linear.linear(torch.zeros(2, 32, dtype=torch.float64), packed)
