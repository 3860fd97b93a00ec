"""engine/kernels/int8_linear.py: fbgemm's dynamic int8 GEMM with a per-element error bound.

The bound must hold against the exact (float64) product and leave room for any float32 GEMM; a
row's result must not depend on the rows it shares the call with (bitwise).
"""
from __future__ import annotations

import pytest
import torch

from engine.kernels import int8_linear

pytestmark = pytest.mark.skipif(int8_linear.unsupported_reason() is not None,
                                reason=f"{int8_linear.unsupported_reason()}")


def _inputs(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random rows with the awkward cases: outliers, all-negative, all-zero, one-hot, tiny."""
    x = torch.randn(rows, k, generator=gen)
    if rows >= 6:
        x[1, k // 3] = 80.0  # one large outlier channel
        x[2] = -x[2].abs()  # all negative
        x[3] = 0.0
        x[4] = 0.0
        x[4, k - 1] = -3.0  # one-hot
        x[5] *= 1e-30  # tiny (subnormal products)
    return x


@pytest.mark.parametrize("rows,k,n", [(1, 64, 300), (7, 576, 1000), (33, 96, 517), (64, 2, 64)])
def test_error_within_bound(rows, k, n):
    gen = torch.Generator().manual_seed(rows * 1000 + k)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0] = 0.0  # an all-zero weight row
    w[1, 0] = 3.0  # a weight outlier: a coarse scale for that row
    x = _inputs(rows, k, gen)
    packed = int8_linear.pack(w)
    ap = int8_linear.approx(x, packed)
    values, bound = ap.unnormalised()
    exact = x.double() @ w.double().T
    err = (exact - values.double()).abs()
    assert bool((err <= bound.double()).all()), f"max err/bound {(err / bound.double()).max().item():.3f}"
    # room left for float32 rounding of any GEMM order: F.linear too is inside
    err32 = (torch.nn.functional.linear(x, w).double() - values.double()).abs()
    assert bool((err32 <= bound.double()).all())
    # and the bound is not vacuous: the approximation is informative on ordinary rows
    assert float(bound[0].median()) < float(exact[0].std())
    if rows >= 6:
        assert torch.equal(values[3], torch.zeros(n))  # an all-zero row is exactly 0


def test_bound_is_not_just_half_a_step():
    """Activations placed exactly half-way between grid points: the worst rounding case."""
    k, n = 128, 200
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(n, k, generator=gen).sign() * 0.1  # aligned with the error's signs
    step = int8_linear.ACT_STEP
    x = (torch.randint(-60, 60, (4, k), generator=gen) + 0.5) * step
    x[:, 0] = 1.0  # row max 1: the rows are their own normalised form
    ap = int8_linear.approx(x, int8_linear.pack(w))
    err = (x.double() @ w.double().T - ap.values.double()).abs()
    assert bool((err <= ap.bound().double()).all())


@pytest.mark.parametrize("k,n", [(576, 2048), (40, 129)])
def test_batch_invariance_bitwise(k, n):
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=gen)
    packed = int8_linear.pack(w)
    x = _inputs(40, k, gen)
    together = int8_linear.approx(x, packed)
    for i in (0, 1, 5, 17, 39):
        alone = int8_linear.approx(x[i:i + 1], packed)
        assert torch.equal(alone.values[0], together.values[i])
        assert torch.equal(alone.bound()[0], together.bound()[i])
    # the same row next to very different neighbours
    mixed = torch.cat([x[7:8] * 1e4, x[17:18], -x[7:8]])
    assert torch.equal(int8_linear.approx(mixed, packed).values[1], together.values[17])


def test_pack_rejects_and_probe_passes():
    with pytest.raises(ValueError, match="float32 \\[N, K >= 2\\]"):
        int8_linear.pack(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="float32"):
        int8_linear.pack(torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be"):
        int8_linear.approx(torch.zeros(2, 5), int8_linear.pack(torch.ones(3, 8)))
    assert int8_linear.probe() is None


# Our own AVX2 GEMM (engine/kernels/csrc/int8_gemm.cpp) on the same codes.
own = pytest.mark.skipif(not int8_linear.own_gemm_available(), reason="no C++ CPU kernels")


def _codes_and_grid(xn: torch.Tensor, w: int8_linear.Int8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 codes q [N, K], int64 activation codes c [R, K]) as int8_gemm.cpp defines them:
    c = nearbyint(float32(x' * 63.5)); checked to be within the bound's residual of x'."""
    q = torch.ops.quantized.linear_unpack(w.packed)[0].int_repr().long()
    c = torch.round(xn * 63.5)  # float32 product, rounded half to even as nearbyint
    s = int8_linear.ACT_STEP
    dist = (xn.double() - s * torch.round(xn.double() / s)).abs()
    assert bool(((xn.double() - c.double() * s).abs() <= dist + s / 64).all())
    return q, c.long()


@own
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 32, 33])
@pytest.mark.parametrize("k,n", [(512, 1001), (67, 40), (2, 31), (576, 97)])
def test_own_gemm_exact_integer_sums(rows, k, n):
    """values / rescale_n is the exact integer sum c·q_n (against int64), for vocab sizes that
    are not a multiple of the 32-token block, K not a multiple of 4, every row-tile remainder,
    codes at ±127 and activations at ±1 (c = ±64) and on half-steps (the rounding ties)."""
    gen = torch.Generator().manual_seed(rows * 1000 + k + n)
    weight = torch.randn(n, k, generator=gen)
    weight[0] = 1.0  # all codes 127
    weight[1] = -1.0  # all codes -127
    x = _inputs(rows, k, gen)
    xn, _ = int8_linear.normalise_rows(x)
    if rows >= 3:
        xn[-1] = torch.where(torch.arange(k) % 2 == 0, 1.0, -1.0)  # |c| = 64: the largest bytes
        xn[-2] = ((torch.arange(k) - k // 2) * (int8_linear.ACT_STEP / 2)).clamp(-1, 1)  # half steps
    w = int8_linear.pack(weight)
    p = int8_linear.pack_panels(w)
    out = int8_linear.run_panels(xn.contiguous(), rows, p)
    q, c = _codes_and_grid(xn, w)
    # the codes pack_panels reads back from fbgemm are the ones pack computed its bound pieces from
    max_abs = weight.abs().amax(dim=1)
    want_q = torch.quantize_per_channel(weight, (max_abs / 127.0).double(), torch.zeros(n, dtype=torch.long), 0,
                                        torch.qint8).int_repr()
    assert torch.equal(q, want_q.long())
    exact = c @ q.T  # int64
    # the products below are exact in float64 and the op rounds once more: compare in float32
    sums = torch.round(out.double() / p.rescale[:n].double()).long()
    assert torch.equal(sums, exact)
    assert torch.equal(out, (exact.float() * p.rescale[:n]))  # the rescale: int -> float (exact here), one product
    ref = torch.ops.conveyor_cpu.int8_gemm_reference(xn.contiguous(), rows, p.panels, p.colsum, p.rescale, n)
    assert torch.equal(out, ref)  # the portable form gives the same bits


@own
@pytest.mark.parametrize("rows,k,n", [(1, 64, 300), (7, 576, 1000), (33, 96, 517)])
def test_own_gemm_within_bound_and_close_to_fbgemm(rows, k, n):
    gen = torch.Generator().manual_seed(rows + 7 * k)
    weight = torch.randn(n, k, generator=gen) * 0.05
    x = _inputs(rows, k, gen)
    w = int8_linear.pack(weight)
    ap = int8_linear.approx(x, w)  # fbgemm's values and the bound's row terms
    xn, _ = int8_linear.normalise_rows(x)
    mine = int8_linear.run_panels(xn.contiguous(), rows, int8_linear.pack_panels(w))
    exact = xn.double() @ weight.double().T
    assert bool(((exact - mine.double()).abs() <= ap.bound().double()).all())
    # the same integers, three float32 roundings each: a few ulps apart at most
    assert bool(((mine - ap.values).abs() <= 4 * 2.0 ** -23 * ap.values.abs() + 1e-30).all())
