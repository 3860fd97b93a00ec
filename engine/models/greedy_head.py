"""The LM head for greedy rows: argmax(x @ W^T) per row without the full float32 GEMM.

Guarantee: `GreedyHead.argmax(x)` returns, per row, the index of the largest float32 logit
x·w_n (lowest index among equal ones, as `torch.argmax`), where each candidate's logit is
computed in float32 from the dense weight; logits computed by another float32 GEMM (oneDNN,
BLAS) differ from these only by float32 rounding, so the two can disagree only on logits tied to
within that rounding.

How (engine/kernels/int8_linear.py holds the bound's derivation):
  1. a ≈ x @ W^T with B such that |x·w_n - a_n| <= B_n for any float32 evaluation of x·w_n.
     Trained models' hidden states have a few outlier channels (SmolLM2: max|x| ~10x the RMS),
     which would make the int8 activation step, and so B, too coarse. So the channels whose
     max |x| over the call's rows is over twice the median channel's (at most `outliers` of
     them, the largest: O) are split off (as LLM.int8() does):
     a = int8(x with O zeroed) + x_O @ W̃_O^T in float32, W̃ a transposed float16 copy of the
     head (half the memory of a float32 one), and B = the int8 part's bound (times that part's
     row scale m_r) + ||x_O||_1 max_k |w_nk - w̃_nk| (the float16 rounding, exact per token)
     + a float32 rounding margin scaled by the full max|x| (it covers the float32 product over
     O, the sum, and any float32 evaluation order of the reference). B = coef_r · pieces_n:
     four per-row coefficients times four per-token numbers. O depends on the batch, so a and
     B do, but the answer (step 3) does not.
  2. t = a_j - B_j at j = argmax a is a lower bound on the row's largest logit, so every n
     with a_n + B_n < t is below it: the candidates are {n : a_n + B_n >= t}. (Rounding is
     monotone and every B is an upper bound, so the float32 comparisons keep this true.)
  3. The candidates' logits are recomputed in float32 from the dense rows; the largest wins,
     lowest index among ties. A row with more than `max_candidates` candidates, or a non-finite
     entry, takes the full float32 head instead (`fallback`).
The tokens are independent of which rows share a call.

Two implementations of the per-call work around fbgemm, with the same tokens: plain torch (below),
and, when the C++ CPU kernels are built (`fused_available()`), two C++ ops: before the GEMM
engine/kernels/csrc/greedy_prepare.cpp (outlier channels, normalised rows, the bound's row
coefficients), after it greedy_screen.cpp (a formed over fbgemm's output in place, with the block
maxima, in one cache-tiled pass; then only the blocks that can hold candidates are read again, and
the candidates' float32 recompute sums in torch's order, so their logits are bitwise the torch
path's). The C++ path's int8 GEMM is our own (engine/kernels/csrc/int8_gemm.cpp: the same codes,
grid and rescale roundings, so the same bound; measured faster than fbgemm's on this class of
CPU, benchmarks/RESULTS.md), fbgemm's where that op is not built (`own_gemm=False`). Either path
sends rows whose a could have overflowed to the full head.

Cost control: when most rows of recent calls fell back (the bound is loose for this model's
hidden states), screening is a net loss, so `argmax` then runs the full head for a while and
tries screening again after `_RETRY_FIRST` calls, doubling the wait after each failed try (up to
`_RETRY_MAX`); the tokens are the same either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from engine.kernels import int8_linear
from engine.kernels.cpu_extension import cpu_ops_available
from engine.kernels.ops import _torch_float_lanes

_SLACK = 1.0 + 2.0 ** -10  # the bound's own float32 rounding (as in int8_linear)
_BLOCK = 32  # tokens per block of the one full pass over the approximate logits (a block max)
_GATHER_CHUNK = 16384  # candidate (row, token) pairs recomputed at once: bounds the gathered copy
_RETRY_FIRST, _RETRY_MAX = 64, 4096  # calls on the full head before screening is tried again
_OUTLIER_FACTOR = 2.0  # a channel is an outlier when its max |x| over the call is this x the median one
_GIVE_UP_FRACTION = 0.5  # smoothed fallback fraction above which screening stops paying
_NO_OVERFLOW = 1e37  # torch path: rows whose |a| could come near float32's max take the full head


def fused_available() -> bool:
    """True when the C++ screening ops (engine/kernels/csrc/greedy_screen.cpp) can run here."""
    return (cpu_ops_available() and hasattr(torch.ops.conveyor_cpu, "greedy_prepare")
            and hasattr(torch.ops.conveyor_cpu, "greedy_screen"))


def _block_max(a: torch.Tensor) -> torch.Tensor:
    """[R, N] -> [R, ceil(N / _BLOCK)]: the max of each block of _BLOCK columns."""
    rows, n = a.shape
    full = n // _BLOCK * _BLOCK
    out = a[:, :full].reshape(rows, -1, _BLOCK).amax(dim=2)
    if full < n:
        out = torch.cat([out, a[:, full:].amax(dim=1, keepdim=True)], dim=1)
    return out


def unsupported_reason(weight: torch.Tensor) -> str | None:
    """None when a `GreedyHead` can be built for this [vocab, hidden] head; otherwise why not."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return f"float32 CPU heads only, not {str(weight.dtype).removeprefix('torch.')} on {weight.device.type}"
    reason = int8_linear.unsupported_reason()
    if reason is None:
        reason = int8_linear.probe()
    if reason is None and not bool(torch.isfinite(weight).all()):
        reason = "the LM head holds non-finite weights"
    return reason


@dataclass
class ScreenResult:
    """One `screen` call: ``tokens`` [R] int64, ``candidates`` [R] each row's candidate count,
    ``fallback`` [R] bool rows that ran the full head instead."""

    tokens: torch.Tensor
    candidates: torch.Tensor
    fallback: torch.Tensor


class GreedyHead:
    """Holds the int8 copy of the head, a reference to its dense form and the full head's path."""

    def __init__(self, dense: torch.Tensor, full_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_candidates: int = 1024, outliers: int = 32, fused: bool | None = None,
                 own_gemm: bool | None = None):
        """``dense`` [vocab, hidden] float32 (shared, not copied); ``full_logits`` the model's own
        full head for the fallback path ([R, hidden] -> float32 [R, vocab]; None: F.linear on
        ``dense``); ``outliers`` channels per call computed in float32 (0: none, and no
        transposed copy); ``fused`` runs the per-call work in the C++ ops (None: when they are
        available; the tokens are the same either way); ``own_gemm`` runs the fused path's int8
        GEMM in engine/kernels/csrc/int8_gemm.cpp instead of fbgemm (None: when built and fused;
        the same bound, so the same tokens). Raises ValueError saying why when screening cannot
        run here."""
        reason = unsupported_reason(dense)
        if reason is not None:
            raise ValueError(f"greedy head screening is not available: {reason}")
        self.dense = dense.detach()
        self._full_logits = full_logits
        self.int8 = int8_linear.pack(self.dense)
        self.outliers = max(0, min(outliers, dense.shape[1] - 2))
        self.dense_t, half_err = None, None
        half = self.dense.half() if self.outliers else None
        if half is not None and bool(torch.isfinite(half).all()):  # else past float16's range: no split
            # [hidden, vocab]: the outlier channels' rows of W̃^T are contiguous
            self.dense_t = half.t().contiguous()
            # float16 -> float32 is exact, and so is the float32 difference (the two agree to
            # 11 bits: Sterbenz), so its max per row needs no float64 copy
            half_err = (self.dense - half.float()).abs().amax(dim=1).double()
        else:
            self.outliers = 0
        del half
        w = self.int8
        pieces = [w.margin, w.l2, w.err_l2, torch.zeros_like(w.l2) if half_err is None else
                  int8_linear.round_up(half_err)]
        self._pieces = torch.stack(pieces, dim=1).contiguous()  # [N, 4]: B_rn = coef_r · pieces_n
        # each block's largest pieces: a bound for every token of the block at once
        self._block_pieces = torch.stack([_block_max(v.unsqueeze(0)).squeeze(0) for v in pieces], dim=1)
        self._pieces_t = self._pieces.t().contiguous()  # [4, N] and [4, blocks] for the C++ op
        self._block_pieces_t = self._block_pieces.t().contiguous()
        self.max_candidates = max_candidates
        if fused and not fused_available():
            raise ValueError("the C++ greedy screening ops (engine/kernels/csrc/greedy_screen.cpp) are not available")
        self.fused = fused_available() if fused is None else fused
        if own_gemm and not (self.fused and int8_linear.own_gemm_available()):
            raise ValueError("our int8 GEMM (engine/kernels/csrc/int8_gemm.cpp) needs the fused path and the C++ kernels")
        if own_gemm is None:
            own_gemm = self.fused and int8_linear.own_gemm_available()
        self.panels = int8_linear.pack_panels(self.int8) if own_gemm else None
        # torch path: |a_rn| <= (m_r + ||x_O||_1) K max|w| (1 + s + float16 and float32 rounding)
        self._overflow_cap = 2.0 * dense.shape[1] * float(self.dense.abs().max())
        self._fallback_ema = 0.0  # smoothed fraction of rows that fell back
        self._skip = 0  # calls left on the full head before screening is tried again
        self._wait = _RETRY_FIRST  # the next such pause

    @property
    def nbytes(self) -> int:
        """Memory this head adds: the int8 copy and the transposed float16 copy (the dense
        weight itself is shared)."""
        extra = 0 if self.dense_t is None else self.dense_t.numel() * self.dense_t.element_size()
        extra += 0 if self.panels is None else self.panels.nbytes
        return self.int8.nbytes + extra

    def full_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._full_logits is not None:
            return self._full_logits(x)
        return F.linear(x, self.dense).float()

    @torch.no_grad()
    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """[R, hidden] -> [R] int64 greedy tokens (see the module doc for the guarantee)."""
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.long)
        if self._skip > 0:
            self._skip -= 1
            return self.full_logits(x).argmax(dim=1)
        retrying = self._fallback_ema < 0  # the first call after a pause
        result = self.screen(x)
        frac = float(result.fallback.float().mean())
        if retrying:  # one try decides: pause again (twice as long), or resume for good
            self._fallback_ema = frac
            self._wait = min(2 * self._wait, _RETRY_MAX) if frac > _GIVE_UP_FRACTION else _RETRY_FIRST
        else:
            self._fallback_ema = 0.75 * self._fallback_ema + 0.25 * frac
        if self._fallback_ema > _GIVE_UP_FRACTION:
            self._skip, self._fallback_ema = self._wait, -1.0
        return result.tokens

    def _approx(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a [R, N], coef [R, 4]) with |x·w_n - a_rn| <= coef_r · pieces_n (step 1), before
        the _SLACK factor; pieces_n = (margin_n, ||w_n||_2, ||w_n - ŵ_n||_2, float16 error)."""
        exact, outlier_l1 = None, torch.zeros(x.shape[0])
        col_max = x.abs().amax(dim=0)
        # only channels well above the typical one are worth their float32 product
        k = min(self.outliers, int((col_max > _OUTLIER_FACTOR * col_max.median()).sum()))
        if k:
            chans = col_max.topk(k).indices
            x_out = x.index_select(1, chans)
            exact = x_out @ self.dense_t.index_select(0, chans).float()
            outlier_l1 = int8_linear.round_up(x_out.double().abs().sum(dim=1))
            x_int8 = x.index_fill(1, chans, 0.0)
        else:
            x_int8 = x
        ap = int8_linear.approx(x_int8, self.int8)
        m = ap.row_scale
        a = ap.values.mul_(m.unsqueeze(1)) if exact is None else exact.addcmul_(ap.values, m.unsqueeze(1))
        coef = torch.stack([m + x.abs().amax(dim=1), m * ap.row_r, m * ap.row_xhat, outlier_l1], dim=1)
        return a, coef

    @torch.no_grad()
    def screen(self, x: torch.Tensor) -> ScreenResult:
        """Steps 1-3 of the module doc for every row of ``x`` [R, hidden] float32."""
        x = x.float().contiguous()
        if self.fused:
            return self._screen_fused(x)
        rows = x.shape[0]
        finite = torch.isfinite(x).all(dim=1)
        xs = torch.where(finite.unsqueeze(1), x, torch.zeros_like(x))
        a, coef = self._approx(xs)
        # One pass over a: the max of each block of _BLOCK tokens. The row's max (and its index,
        # for t) and the blocks that can hold candidates follow from these; only those blocks'
        # entries are read again.
        blocks = _block_max(a)
        n = a.shape[1]
        lanes = torch.arange(_BLOCK)
        top_cols = (blocks.argmax(dim=1, keepdim=True) * _BLOCK + lanes).clamp_max_(n - 1)
        top_vals, at = a.gather(1, top_cols).max(dim=1)
        top = top_cols.gather(1, at.unsqueeze(1)).squeeze(1)
        t = top_vals - (coef * self._pieces.index_select(0, top)).sum(dim=1) * _SLACK
        # blocks that may hold a candidate (each block's largest B), then each token's own B
        b_block = (coef @ self._block_pieces.t()) * _SLACK
        rb, bb = ((blocks + b_block) >= t.unsqueeze(1)).nonzero(as_tuple=True)
        cols = (bb.unsqueeze(1) * _BLOCK + lanes).view(-1)  # past n only in a last short block
        rows_of = rb.repeat_interleave(_BLOCK)
        inside = (cols < n).nonzero().squeeze(1)
        r_idx, n_idx = rows_of.index_select(0, inside), cols.index_select(0, inside)
        vals = a.reshape(-1).index_select(0, r_idx * n + n_idx)  # (a is contiguous: a view)
        b = (coef.index_select(0, r_idx) * self._pieces.index_select(0, n_idx)).sum(dim=1)
        keep = ((vals + b.mul_(_SLACK)) >= t.index_select(0, r_idx)).nonzero().squeeze(1)
        r_idx, n_idx = r_idx.index_select(0, keep), n_idx.index_select(0, keep)
        counts = torch.bincount(r_idx, minlength=rows)
        # a float32 overflow in a would void the bound: rows where one is possible fall back
        no_overflow = (coef[:, 0] + coef[:, 3]) * self._overflow_cap < _NO_OVERFLOW
        fallback = (counts > self.max_candidates) | ~finite | ~no_overflow
        tokens = torch.full((rows,), self.int8.out_features, dtype=torch.long)
        screened = ~fallback[r_idx]
        if bool(screened.any()):
            r_idx, n_idx = r_idx[screened], n_idx[screened]
            z = torch.cat([(self.dense.index_select(0, n) * x.index_select(0, r)).sum(dim=1)
                           for r, n in zip(r_idx.split(_GATHER_CHUNK), n_idx.split(_GATHER_CHUNK))])
            best = torch.full((rows,), float("-inf")).scatter_reduce(0, r_idx, z, "amax")
            at_best = z == best[r_idx]
            tokens.scatter_reduce_(0, r_idx[at_best], n_idx[at_best], "amin")
        fallback |= tokens == self.int8.out_features  # no logit equal to the max: a NaN among them
        self._full_head_rows(x, tokens, fallback)
        return ScreenResult(tokens, counts, fallback)

    def _screen_fused(self, x: torch.Tensor) -> ScreenResult:
        """`screen` through the C++ ops (engine/kernels/csrc/greedy_screen.cpp): the same steps
        and the same float32 logits for the candidates (summed in torch's order), so the same
        tokens; a is never materialised beyond the int8 GEMM's output, and rows whose a holds a
        non-finite entry (an overflow) fall back."""
        ops = torch.ops.conveyor_cpu
        inp, m, coef, chans, finite = ops.greedy_prepare(x, self.outliers, _OUTLIER_FACTOR)
        if self.panels is not None:  # our GEMM quantizes the rows itself: no need for the sentinel row
            values = int8_linear.run_panels(inp, x.shape[0], self.panels)
        else:
            values = torch.ops.quantized.linear_dynamic(inp, self.int8.packed, True)  # the sentinel row last
        dense_t = self.dense_t if self.dense_t is not None else torch.empty(0, dtype=torch.float16)
        tokens, counts, fallback = ops.greedy_screen(values, m, coef, x, chans, dense_t, self._pieces_t,
                                                     self._block_pieces_t, self.dense, finite,
                                                     self.max_candidates, _torch_float_lanes())
        self._full_head_rows(x, tokens, fallback)
        return ScreenResult(tokens, counts, fallback)

    def _full_head_rows(self, x: torch.Tensor, tokens: torch.Tensor, fallback: torch.Tensor) -> None:
        """tokens[fallback] = the full float32 head's argmax for those rows."""
        if bool(fallback.any()):
            idx = fallback.nonzero().squeeze(1)
            tokens[idx] = self.full_logits(x.index_select(0, idx)).argmax(dim=1)
