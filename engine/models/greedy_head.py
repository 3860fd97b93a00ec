"""The LM head for greedy rows: argmax(x @ W^T) per row without the full float32 GEMM.

Guarantee: `GreedyHead.argmax(x)` returns, per row, the index of the largest float32 logit
x·w_n (lowest index among equal ones, as `torch.argmax`), where each candidate's logit is
computed in float32 from the dense weight; logits computed by another float32 GEMM (oneDNN,
BLAS) differ from these only by float32 rounding, so the two can disagree only on logits tied to
within that rounding.

How (engine/kernels/int8_linear.py holds the bound's derivation):
  1. a ≈ x' @ W^T through fbgemm's int8 GEMM (x' = x / max|x| per row), with B such that
     |x'·w_n - a_n| <= B_n for any float32 evaluation of x'·w_n.
  2. t = a_j - B_j at j = argmax a is a lower bound on the row's largest logit, so every n
     with a_n + B_n < t is below it: the candidates are {n : a_n + B_n >= t}. (Rounding is
     monotone and every B is an upper bound, so the float32 comparisons keep this true.)
  3. The candidates' logits are recomputed in float32 from the dense rows; the largest wins,
     lowest index among ties. A row with more than `max_candidates` candidates, or a non-finite
     entry, takes the full float32 head instead (`fallback`).
Rows are independent of each other: which rows share a call changes nothing.

Cost control: when most rows of recent calls fell back (the bound is loose for this model's
hidden states), screening is a net loss, so `argmax` then runs the full head for a while and
tries screening again after `_RETRY_FIRST` calls, doubling the wait after each failed try (up to
`_RETRY_MAX`); the tokens are the same either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kernels import int8_linear, onednn_linear

_SLACK = 1.0 + 2.0 ** -10  # the bound's own float32 rounding (as in int8_linear)
_BLOCK = 64  # tokens per block of the one full pass over the approximate logits (a block max)
_GATHER_CHUNK = 16384  # candidate (row, token) pairs recomputed at once: bounds the gathered copy
_RETRY_FIRST, _RETRY_MAX = 64, 4096  # calls on the full head before screening is tried again
_GIVE_UP_FRACTION = 0.5  # smoothed fallback fraction above which screening stops paying


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
    """Holds the int8 copy of the head and references to its dense (and oneDNN-packed) forms."""

    def __init__(self, dense: torch.Tensor, packed: torch.Tensor | None = None, max_candidates: int = 1024):
        """``dense`` [vocab, hidden] float32 (shared, not copied); ``packed`` its oneDNN form for
        the full-head path (None: F.linear on ``dense``)."""
        reason = unsupported_reason(dense)
        if reason is not None:
            raise ValueError(f"greedy head screening is not available: {reason}")
        self.dense = dense.detach()
        self.packed = packed
        self.int8 = int8_linear.pack(self.dense)
        self.max_candidates = max_candidates
        self._fallback_ema = 0.0  # smoothed fraction of rows that fell back
        self._skip = 0  # calls left on the full head before screening is tried again
        self._wait = _RETRY_FIRST  # the next such pause

    @property
    def nbytes(self) -> int:
        """Memory this head adds (the int8 copy; the dense weight is shared)."""
        return self.int8.nbytes

    def full_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return onednn_linear.linear(x, self.packed, None).float()
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

    @torch.no_grad()
    def screen(self, x: torch.Tensor) -> ScreenResult:
        """Steps 1-3 of the module doc for every row of ``x`` [R, hidden] float32."""
        x = x.float().contiguous()
        rows = x.shape[0]
        finite = torch.isfinite(x).all(dim=1)
        xs = torch.where(finite.unsqueeze(1), x, torch.zeros_like(x))
        ap = int8_linear.approx(xs, self.int8)
        a, w = ap.values, self.int8
        # One pass over a: the max of each block of _BLOCK tokens. The row's max (and its index,
        # for t) and the blocks that can hold candidates follow from these; only those blocks'
        # entries are read again.
        blocks = _block_max(a)
        n = a.shape[1]
        lanes = torch.arange(_BLOCK)
        top_cols = (blocks.argmax(dim=1, keepdim=True) * _BLOCK + lanes).clamp_max_(n - 1)
        top_vals, at = a.gather(1, top_cols).max(dim=1)
        top = top_cols.gather(1, at.unsqueeze(1)).squeeze(1)
        b_top = (w.margin[top] + ap.row_r * w.l2[top] + ap.row_xhat * w.err_l2[top]) * _SLACK
        t = top_vals - b_top
        # a superset first, with the row's largest B, then each pair's own B
        b_max = (w.margin.max() + ap.row_r * w.l2.max() + ap.row_xhat * w.err_l2.max()) * _SLACK
        rb, bb = ((blocks + b_max.unsqueeze(1)) >= t.unsqueeze(1)).nonzero(as_tuple=True)
        cols = bb.unsqueeze(1) * _BLOCK + lanes  # [blocks, _BLOCK]; past n only in a last short block
        flat = (rb.unsqueeze(1) * n + cols.clamp_max(n - 1)).view(-1)
        vals = a.reshape(-1).index_select(0, flat).view(cols.shape)  # (a is contiguous: a view)
        inside = (cols < n) & ((vals + b_max[rb].unsqueeze(1)) >= t[rb].unsqueeze(1))
        pick = inside.view(-1).nonzero().squeeze(1)
        r_idx, n_idx = rb.index_select(0, pick // _BLOCK), cols.view(-1).index_select(0, pick)
        b = (w.margin[n_idx] + ap.row_r[r_idx] * w.l2[n_idx] + ap.row_xhat[r_idx] * w.err_l2[n_idx]) * _SLACK
        keep = (vals.view(-1).index_select(0, pick) + b) >= t[r_idx]
        r_idx, n_idx = r_idx[keep], n_idx[keep]
        counts = torch.bincount(r_idx, minlength=rows)
        fallback = (counts > self.max_candidates) | ~finite
        tokens = torch.empty(rows, dtype=torch.long)
        screened = ~fallback[r_idx]
        if bool(screened.any()):
            r_idx, n_idx = r_idx[screened], n_idx[screened]
            z = torch.cat([(self.dense.index_select(0, n) * x.index_select(0, r)).sum(dim=1)
                           for r, n in zip(r_idx.split(_GATHER_CHUNK), n_idx.split(_GATHER_CHUNK))])
            best = torch.full((rows,), float("-inf")).scatter_reduce(0, r_idx, z, "amax")
            at_best = z == best[r_idx]
            first = torch.full((rows,), self.int8.out_features, dtype=torch.long)
            first.scatter_reduce_(0, r_idx[at_best], n_idx[at_best], "amin")
            tokens.copy_(first)
        if bool(fallback.any()):
            idx = fallback.nonzero().squeeze(1)
            tokens[idx] = self.full_logits(x.index_select(0, idx)).argmax(dim=1)
        return ScreenResult(tokens, counts, fallback)
