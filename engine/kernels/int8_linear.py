"""An approximate linear layer through fbgemm's dynamic int8 GEMM, with a rigorous error bound.

`pack` quantizes a float32 weight [N, K] per output row (symmetric int8, scale max|w_n| / 127,
codes in [-127, 127]) and prepacks it for `torch.ops.quantized.linear_dynamic`; it also keeps,
per row n, ||w_n||_1 and the row's quantization error e_n = max_k |w_nk - ŵ_nk| (ŵ = code *
scale, computed in float64 from the float32 scale fbgemm uses).

`approx(x, w)` returns a ≈ x @ W^T and `bound()` returns B with |x @ W^T - a| <= B elementwise,
for *any* float32 evaluation order of x @ W^T (so also oneDNN's or BLAS's). How:

* Batch invariance and a known activation grid. `linear_dynamic` picks one (scale, zero point)
  for the whole input from its min and max. Each row is divided by its own max |x| (so it lies
  in [-1, 1]) and one sentinel row [1, -1, 0, ...] is appended, so the input's range is always
  exactly [-1, 1]: the activation step is s = 2/127 with ``reduce_range`` (7-bit range, which
  keeps AVX2's int16 pair sums, vpmaddubsw, from saturating: 2 * 128 * 127 < 2^15), whatever
  else shares the batch, and zero is a grid point (the zero point is an integer), so the grid
  is s·Z. The int32 accumulation is exact and the rescale is elementwise, so a row's result is
  bitwise the same alone or in any batch (tests/test_int8_linear.py). `probe()` checks these
  assumptions on this torch build (codes on s·Z, nearest rounding); callers use the bound only
  when it passes.
* The bound, in the normalised row x' = x / m (m = max|x|, so ||x'||_inf = 1), with x̂ the
  quantized activation, r = x' - x̂, and ŵ the quantized weight:
      x'·w_n - x̂·ŵ_n = r·w_n + x̂·(w_n - ŵ_n)
      |r·w_n|             <= ||r||_2 ||w_n||_2               (Cauchy-Schwarz)
      |x̂·(w_n - ŵ_n)|   <= ||x̂||_2 ||w_n - ŵ_n||_2,  ||x̂||_2 <= ||x'||_2 + ||r||_2
  ||r||_2 is bounded per row from x' itself: |r_k| <= dist(x'_k, s·Z) + s/64 (nearest rounding,
  the s/64 absorbs a scale off by a few ulps). Cauchy-Schwarz rather than |r|_inf ||w||_1 (the
  textbook bound) because it is ~2.5x tighter at K = 576, and the candidate count grows fast with
  the bound. Plus float32 rounding: any float32 dot product of length K is within
  γ_K Σ|x'_k w_nk| <= γ_K ||w_n||_1 of the exact one (γ_K = K u / (1 - K u), u = 2^-24), and
  fbgemm's rescale of the exact integer sum adds a few u relative to |x̂·ŵ_n| <= (1 + s)
  (||w_n||_1 + ||w_n - ŵ_n||_1). margin_n = 2 (K + 16) u (1 + s)(||w_n||_1 + ||w_n - ŵ_n||_1)
  covers both. Every norm is computed in float64 and rounded up to float32, and `bound`
  inflates its float32 result by 2^-10 so its own rounding cannot make it too small. Scaled
  back by m for x.

`pack_panels` / `run_panels`: the same codes through our own AVX2 GEMM
(engine/kernels/csrc/int8_gemm.cpp) instead of fbgemm's, where the C++ kernels are built. It
quantizes the normalised rows itself onto the same grid s·Z (c = nearbyint(63.5 x'), |c| <= 64,
so |x'_k - x̂_k| <= dist(x'_k, s·Z) + s/64 as above), sums c·q exactly in int32, and rescales
with the same three float32 roundings as fbgemm (int32 -> float, exact up to K = 2064; the
product s·ω_n, once, at pack; the multiply): |value - x̂·ŵ_n| <= (3u + 3u²)|x̂·ŵ_n|, inside the
"few u" of margin_n (which is 2 (K + 16) u against γ_K + 3.01 u needed). So the same pieces and
the same bound hold for it; its values may differ from fbgemm's by an ulp (rounding order).

`unsupported_reason()` says when this torch build cannot run it (no fbgemm/x86 quantized
engine). The quantized-tensor API used here is deprecated upstream (its warning is silenced).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

# Activation quantization step once every row is normalised into [-1, 1] (see module doc).
ACT_STEP = 2.0 / 127.0
_U = 2.0 ** -24  # unit roundoff of float32
_SLACK = 1.0 + 2.0 ** -10  # covers the float32 rounding of the bound's own arithmetic
_STATS_ROWS = 4096  # weight rows per float64 slice when computing the bound pieces


def unsupported_reason() -> str | None:
    """None when `pack`/`approx` can run here; otherwise why not."""
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" not in engines and "x86" not in engines:
        return "this torch build has no fbgemm (x86) quantized engine"
    if not hasattr(torch.ops.quantized, "linear_dynamic"):
        return "this torch build has no quantized.linear_dynamic"
    return None


@dataclass(frozen=True)
class Int8Weight:
    """A weight [out_features, in_features] packed for fbgemm, with its per-row bound pieces
    (float32, rounded up): ``l2[n]`` = ||w_n||_2, ``err_l2[n]`` = ||w_n - ŵ_n||_2 and
    ``margin[n]`` (float32 rounding, see the module doc)."""

    packed: torch.ScriptObject
    out_features: int
    in_features: int
    l2: torch.Tensor  # [N]
    err_l2: torch.Tensor  # [N]
    margin: torch.Tensor  # [N]

    @property
    def nbytes(self) -> int:
        """Approximate memory: the int8 codes plus the per-row vectors."""
        return self.out_features * (self.in_features + 5 * 4)


def round_up(x64: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, never below the float64 value."""
    x32 = x64.float()
    return torch.where(x32.double() < x64, torch.nextafter(x32, torch.tensor(float("inf"))), x32)


@torch.no_grad()
def pack(weight: torch.Tensor) -> Int8Weight:
    """Quantizes a finite float32 [N, K] CPU weight (K >= 2) per output row and prepacks it."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.shape[1] < 2:
        raise ValueError(f"int8_linear.pack needs a float32 [N, K >= 2] CPU weight, got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}")
    w = weight.detach().contiguous()
    n, k = w.shape
    max_abs = w.abs().amax(dim=1)
    # an all-zero row: any positive scale gives codes 0 and no error
    scale = torch.where(max_abs > 0, max_abs / 127.0, torch.ones_like(max_abs))
    with warnings.catch_warnings():  # the quantized-tensor API is deprecated upstream
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(q, None)
    used_scale = q.q_per_channel_scales().float().double()  # fbgemm multiplies by float32 scales
    codes = q.int_repr()
    stats = torch.empty(n, 4, dtype=torch.float64)  # ||w||_1, ||w||_2, ||w - ŵ||_1, ||w - ŵ||_2
    for start in range(0, n, _STATS_ROWS):  # in float64, a slice at a time (no full float64 copy)
        rows = slice(start, start + _STATS_ROWS)
        w64 = w[rows].double()
        err = w64 - codes[rows].double() * used_scale[rows].unsqueeze(1)
        stats[rows] = torch.stack([w64.abs().sum(dim=1), w64.norm(dim=1), err.abs().sum(dim=1), err.norm(dim=1)], 1)
    margin = 2.0 * (k + 16) * _U * (1.0 + ACT_STEP) * (stats[:, 0] + stats[:, 2])
    return Int8Weight(packed, n, k, round_up(stats[:, 1]), round_up(stats[:, 3]), round_up(margin))


@dataclass(frozen=True)
class Int8Approx:
    """The result of `approx` for R rows: ``values`` [R, N] ≈ x' @ W^T in the normalised rows
    x' = x / row_scale; ``row_r`` >= ||x' - x̂||_2 and ``row_xhat`` >= ||x̂||_2 ([R], float32)."""

    values: torch.Tensor
    row_scale: torch.Tensor  # [R] max |x| per row (1 for an all-zero row)
    row_r: torch.Tensor
    row_xhat: torch.Tensor
    weight: Int8Weight

    def bound(self) -> torch.Tensor:
        """[R, N] B with |x' @ W^T - values| <= B (normalised units; times row_scale for x)."""
        w = self.weight
        b = torch.addcmul(w.margin.unsqueeze(0), self.row_r.unsqueeze(1), w.l2.unsqueeze(0))
        return b.addcmul_(self.row_xhat.unsqueeze(1), w.err_l2.unsqueeze(0)).mul_(_SLACK)

    def unnormalised(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, bound) for x itself: both times each row's scale."""
        s = self.row_scale.unsqueeze(1)
        return self.values * s, self.bound().mul_(s).mul_(_SLACK)


def normalise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / m, m) with m = max |x| per row (1 where a row is all zeros): rows in [-1, 1], and
    the largest entry exactly ±1 (float division of m by itself)."""
    m = x.abs().amax(dim=1)
    m = torch.where(m > 0, m, torch.ones_like(m))
    return x / m.unsqueeze(1), m


def _run(xn: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """fbgemm on the normalised rows plus the sentinel row (dropped from the result)."""
    rows = xn.shape[0]
    inp = xn.new_zeros(rows + 1, weight.in_features)
    inp[:rows] = xn
    inp[rows, 0] = 1.0  # the sentinel row: the input's range is exactly [-1, 1]
    inp[rows, 1] = -1.0
    return torch.ops.quantized.linear_dynamic(inp, weight.packed, True)[:rows]


@torch.no_grad()
def approx(x: torch.Tensor, weight: Int8Weight) -> Int8Approx:
    """Approximate x @ W^T for finite float32 x [R, K]; bitwise batch-invariant per row."""
    if x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"x must be [rows, {weight.in_features}], got {tuple(x.shape)}")
    xn, m = normalise_rows(x.float())
    values = _run(xn, weight)
    x64 = xn.double()
    dist = (x64 - ACT_STEP * torch.round(x64 / ACT_STEP)).abs() + ACT_STEP / 64
    r = dist.norm(dim=1)
    return Int8Approx(values, m, round_up(r), round_up(x64.norm(dim=1) + r), weight)


@torch.no_grad()
def probe() -> str | None:
    """None when fbgemm quantizes activations as the bound assumes (codes on the grid s·Z, each
    within s/2 of its input); otherwise what differs. Runs an identity weight over a few rows."""
    k = 67
    eye = pack(torch.eye(k))
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(6, k, generator=gen) * 2 - 1, torch.linspace(-1, 1, k).unsqueeze(0),
                   ((torch.arange(k) - k // 2) * (ACT_STEP / 2)).clamp(-1, 1).unsqueeze(0)])  # half-way points
    xn, _ = normalise_rows(x)
    codes = _run(xn, eye) / ACT_STEP  # the identity's codes are 127 * (1/127): ŵ = 1 to a few ulps
    off_grid = (codes - codes.round()).abs().max().item()
    err = ((codes.round() * ACT_STEP - xn).abs().max() / ACT_STEP).item()
    if off_grid > 1e-3 or err > 0.5 + 1e-3:
        return f"fbgemm's activation grid differs from the assumed one (off grid {off_grid:.3g}, error {err:.3g} steps)"
    return None


def own_gemm_available() -> bool:
    """True when engine/kernels/csrc/int8_gemm.cpp's ops are built and registered here."""
    from engine.kernels.cpu_extension import cpu_ops_available
    return cpu_ops_available() and hasattr(torch.ops.conveyor_cpu, "int8_gemm")


@dataclass(frozen=True)
class Int8Panels:
    """An `Int8Weight`'s codes laid out for `torch.ops.conveyor_cpu.int8_gemm` ([blocks of 32
    tokens, K4 / 4, 128] int8), with per padded column the codes' sum (int32) and the rescale
    float32(s ω_n)."""

    panels: torch.Tensor
    colsum: torch.Tensor
    rescale: torch.Tensor
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.panels.numel() + 8 * self.colsum.numel()


@torch.no_grad()
def pack_panels(weight: Int8Weight) -> Int8Panels:
    """The codes and float32 scales fbgemm holds (so the bound pieces of `pack` hold as they
    are), packed for our GEMM. Needs `own_gemm_available()`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ops.quantized.linear_unpack(weight.packed)[0]
    codes = q.int_repr().contiguous()
    panels = torch.ops.conveyor_cpu.int8_gemm_pack(codes)
    padded = panels.shape[0] * 32
    colsum = torch.zeros(padded, dtype=torch.int32)
    colsum[:weight.out_features] = codes.sum(dim=1, dtype=torch.int32)
    rescale = torch.zeros(padded)
    # float32(s ω_n): the float64 product (within 2^-52 relative of the exact one), rounded once
    rescale[:weight.out_features] = (q.q_per_channel_scales().float().double() * ACT_STEP).float()
    return Int8Panels(panels, colsum, rescale, weight.out_features)


def run_panels(xn: torch.Tensor, rows: int, weight: Int8Panels) -> torch.Tensor:
    """[rows, N] float32 ≈ x' @ W^T for the first `rows` normalised rows of ``xn`` (float32,
    contiguous, entries in [-1, 1]), through engine/kernels/csrc/int8_gemm.cpp."""
    return torch.ops.conveyor_cpu.int8_gemm(xn, rows, weight.panels, weight.colsum, weight.rescale,
                                            weight.out_features)
