"""The Q4_1 kernel (engine/kernels/q4_1_linear.py) against the float32 GEMM on gguf's
dequantized weights: bit-identical (torch.equal) for every M, N, K, bias and thread count
tried, and close to F.linear; bad inputs raise ValueError."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.kernels import cpu_gemm, q4_1_linear

CPU = torch.device("cpu")
REASON = q4_1_linear.unsupported_reason(CPU) or cpu_gemm.unsupported_reason(torch.float32, CPU)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"kernel unavailable: {REASON}")


def random_q4_1(n: int, k: int, seed: int) -> np.ndarray:
    """uint8 [n, k / 32 * 20]: random codes, fp16 d in [1e-3, 3e-2], m in [-0.2, 0]."""
    rng = np.random.default_rng(seed)
    blocks = k // 32
    raw = np.empty((n, blocks, 20), np.uint8)
    raw[..., 0:2] = rng.uniform(1e-3, 3e-2, (n, blocks)).astype(np.float16).view(np.uint8).reshape(n, blocks, 2)
    raw[..., 2:4] = rng.uniform(-0.2, 0.0, (n, blocks)).astype(np.float16).view(np.uint8).reshape(n, blocks, 2)
    raw[..., 4:] = rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8)
    return raw.reshape(n, blocks * 20)


def dequantized(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gguf.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).copy())


@pytest.fixture
def threads():
    """Runs the test body at a thread count of its choice, then restores torch's."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("k", [32, 576, 1536])
@pytest.mark.parametrize("n", [8, 13, 576, 960])
def test_bit_identical_to_cpu_gemm_on_dequantized(n, k, threads):
    raw = random_q4_1(n, k, seed=n * 7 + k)
    w = dequantized(raw)
    q4, f32 = q4_1_linear.pack(torch.from_numpy(raw)), cpu_gemm.pack(w)
    assert (q4.out_features, q4.in_features) == (n, k)
    gen = torch.Generator().manual_seed(k + n)
    bias = torch.randn(n, generator=gen)
    for num_threads in (1, 2):
        threads(num_threads)
        for m in (0, 1, 2, 3, 4, 5, 6, 8, 11, 16, 33):  # 1-10: register tiles, 11+: decoded panels
            x = torch.randn(m, k, generator=gen)
            for b in (None, bias):
                got = q4_1_linear.linear(x, q4, b)
                assert got.shape == (m, n) and got.dtype == torch.float32
                assert torch.equal(got, cpu_gemm.linear(x, f32, b)), (m, n, k, b is not None, num_threads)
                torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-4, atol=1e-4)


def test_rows_do_not_depend_on_the_batch():
    raw = random_q4_1(96, 576, seed=3)
    q4 = q4_1_linear.pack(torch.from_numpy(raw))
    x = torch.randn(13, 576, generator=torch.Generator().manual_seed(0))
    full = q4_1_linear.linear(x, q4)
    for i in range(13):
        assert torch.equal(q4_1_linear.linear(x[i:i + 1], q4), full[i:i + 1])


def test_leading_dims_and_nbytes():
    raw = random_q4_1(40, 64, seed=5)
    q4 = q4_1_linear.pack(torch.from_numpy(raw))
    assert q4.nbytes == 2 * 2 * 640  # 40 rows -> 2 panels of 32, K = 64 -> 2 blocks
    x = torch.randn(2, 3, 64)
    assert torch.equal(q4_1_linear.linear(x, q4), q4_1_linear.linear(x.reshape(6, 64), q4).reshape(2, 3, 40))


def test_non_finite_scales_match_gguf():
    """Inf/NaN fp16 scales and mins give gguf's weights too (0 * inf = NaN in both)."""
    raw = random_q4_1(16, 64, seed=9)
    for row, (d, m) in enumerate([(np.inf, 0.0), (1e-2, -np.inf), (np.nan, 0.0), (65504.0, -65504.0)]):
        raw[row, 0:2] = np.array([d], np.float16).view(np.uint8)
        raw[row, 2:4] = np.array([m], np.float16).view(np.uint8)
    with np.errstate(invalid="ignore"):  # gguf's own 0 * inf
        w = dequantized(raw)
    x = torch.randn(3, 64)
    got = q4_1_linear.linear(x, q4_1_linear.pack(torch.from_numpy(raw)))
    ref = cpu_gemm.linear(x, cpu_gemm.pack(w), None)
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("raw, problem", [
    (torch.zeros(4, 20, dtype=torch.int8), "uint8"),
    (torch.zeros(4, 21, dtype=torch.uint8), "20-byte"),
    (torch.zeros(4, 0, dtype=torch.uint8), "N, K > 0"),
    (torch.zeros(0, 20, dtype=torch.uint8), "N, K > 0"),
    (torch.zeros(80, dtype=torch.uint8), "[N, K / 32 * 20]"),
])
def test_pack_rejects_bad_raw(raw, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("*", r"\*")):
        q4_1_linear.pack(raw)


def test_linear_rejects_bad_inputs():
    q4 = q4_1_linear.pack(torch.from_numpy(random_q4_1(8, 64, seed=1)))
    with pytest.raises(ValueError, match="float32"):
        q4_1_linear.linear(torch.zeros(2, 64, dtype=torch.float64), q4)
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        q4_1_linear.linear(torch.zeros(2, 32), q4)
    with pytest.raises(ValueError, match="bias"):
        q4_1_linear.linear(torch.zeros(2, 64), q4, torch.zeros(9))
    with pytest.raises(ValueError, match="bias"):
        q4_1_linear.linear(torch.zeros(2, 64), q4, torch.zeros(8, dtype=torch.float64))
