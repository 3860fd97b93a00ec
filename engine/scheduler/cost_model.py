"""How long one engine step takes, as a function of what the scheduler put into it.

The simulator replaces the model with this formula:

    step_seconds = base_s + per_token_s * num_batched_tokens
                          + per_context_token_s * sum_context + per_seq_s * num_seqs
                          + multi_row_s * (num_batched_tokens > 1)
                          + row_residual_s[num_batched_tokens - 1]   (small steps, when fitted)

What each term stands for (the calibration times whole ``LLMEngine.step()`` calls, so Python
scheduling, metadata, sampling and output processing are inside the terms, not beside them):

- ``base_s``: the fixed cost of any step: reading every weight once (a small model's decode is
  memory-bound), plus the step's Python (schedule, metadata, detokenize; under 1 ms measured).
- ``per_token_s``: each new token fed this step (prefill chunks + one per decode) through the
  dense layers; it dominates prefill.
- ``per_context_token_s``: attention, which reads every scheduled sequence's whole context
  (``sum_context`` = sum of lengths after the step), so a long conversation's decode costs more.
- ``per_seq_s``: per sequence in the batch: its logits row (a vocabulary-wide matmul row),
  sampling, its attention call and output processing.
- ``multi_row_s``: the jump from one row to several. With one token every linear layer is a
  matrix-vector product; with two or more it is a matrix-matrix product, which a CPU BLAS pays
  a fixed price for (packing the weights); measured on the 2-core AVX2 host: a batch-2 decode
  costs ~1.8x a batch-1 decode, then each further sequence adds a few ms. A linear model
  without this term, fitted to batch sizes 1, 4 and 16 (the BLAS kernels' best row counts),
  underpredicted the decodes of batch 2-7 that real traces run by 15-30 % (issue 17).
- ``row_residual_s``: what no linear term can say: BLAS kernels are tuned for some row counts
  (a 3-row decode measured ~50 % slower than a 4-row one on the AVX2 host). Entry M-1 is the
  median of (measured - linear terms) over the calibration steps of M new tokens, for M up to
  the table's length; larger steps use the linear terms alone. Empty unless fitted with
  ``row_table=``; it may be negative, and a predicted step is never below 0.

``fit`` finds the coefficients by least squares on relative error (each step weighted by
1 / its time, so hundreds of 60 ms decodes are not drowned by a few 2 s prefills), keeping them
non-negative so a fitted model never predicts a step that gets faster as it grows.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

_COEFFS = ("base_s", "per_token_s", "per_context_token_s", "per_seq_s", "multi_row_s")
_REQUIRED = _COEFFS[:4]  # files written before multi_row_s existed still load (it reads as 0)


@dataclass(frozen=True)
class StepSample:
    """One measured step of the real engine."""

    num_batched_tokens: int
    sum_context: int
    num_seqs: int
    seconds: float


def _features(num_batched_tokens: int, sum_context: int, num_seqs: int) -> list[float]:
    return [1.0, num_batched_tokens, sum_context, num_seqs, float(num_batched_tokens > 1)]


@dataclass(frozen=True)
class CostModel:
    """Step time in seconds; all coefficients are >= 0 (checked at construction)."""

    base_s: float = 0.030
    per_token_s: float = 0.00025
    per_context_token_s: float = 0.000002
    per_seq_s: float = 0.002
    source: str = "built-in default (illustrative numbers, not a measurement: calibrate for predictions)"
    fit_info: dict = field(default_factory=dict, compare=False)
    multi_row_s: float = 0.0
    row_residual_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in _COEFFS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")

    def step_time(self, num_batched_tokens: int, sum_context: int, num_seqs: int) -> float:
        t = (self.base_s + self.per_token_s * num_batched_tokens
             + self.per_context_token_s * sum_context + self.per_seq_s * num_seqs
             + (self.multi_row_s if num_batched_tokens > 1 else 0.0))
        if 0 < num_batched_tokens <= len(self.row_residual_s):
            t = max(t + self.row_residual_s[num_batched_tokens - 1], 0.0)
        return t

    # -- fitting ------------------------------------------------------------------------------
    @classmethod
    def fit(cls, samples: list[StepSample], source: str = "fitted", row_table: int = 0) -> "CostModel":
        """Non-negative least squares on relative error (needs at least 5 samples), then, with
        ``row_table`` > 0, the residual table for steps of 1..``row_table`` new tokens (an entry
        with no sample stays 0).

        The fit drops any coefficient that comes out negative and refits the rest (a tiny
        active-set NNLS; five unknowns make it exact enough). ``fit_info`` records the number
        of samples and the mean absolute relative error of the fit on them, overall and on
        decode-only steps (one new token per sequence).
        """
        if len(samples) < len(_COEFFS):
            raise ValueError(f"samples must hold at least {len(_COEFFS)} steps, got {len(samples)}")
        x = np.array([_features(s.num_batched_tokens, s.sum_context, s.num_seqs) for s in samples])
        y = np.array([s.seconds for s in samples])
        w = 1.0 / np.maximum(y, 1e-9)  # relative error: each step counts the same
        active = list(range(len(_COEFFS)))
        coef = np.zeros(len(_COEFFS))
        while active:
            sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
            if (sol >= 0).all():
                coef[:] = 0
                coef[active] = sol
                break
            active.pop(int(np.argmin(sol)))  # drop the most negative term and refit
        linear = cls(**dict(zip(_COEFFS, (float(c) for c in coef))), source=source)
        tokens = np.array([s.num_batched_tokens for s in samples])
        table = tuple(float(np.median((y - x @ coef)[tokens == m])) if (tokens == m).any() else 0.0
                      for m in range(1, row_table + 1))
        model = replace(linear, row_residual_s=table)
        pred = np.array([model.step_time(s.num_batched_tokens, s.sum_context, s.num_seqs) for s in samples])
        rel = np.abs(pred - y) * w
        decode = np.array([s.num_batched_tokens == s.num_seqs for s in samples])
        info = {"num_samples": len(samples), "mean_abs_rel_error": float(rel.mean()),
                "decode_mean_abs_rel_error": float(rel[decode].mean()) if decode.any() else None,
                "linear_terms_mean_abs_rel_error": float((np.abs(x @ coef - y) * w).mean())}
        return replace(model, fit_info=info)

    def scaled(self, factor: float) -> "CostModel":
        """Every step ``factor`` times as long (e.g. the machine's speed during one run)."""
        return replace(self, row_residual_s=tuple(factor * v for v in self.row_residual_s),
                       **{k: factor * getattr(self, k) for k in _COEFFS})

    # -- files --------------------------------------------------------------------------------
    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "CostModel":
        data = json.loads(Path(path).read_text())
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ValueError(f"cost model file {path} lacks the field {missing[0]!r}")
        model = cls(**{k: data[k] for k in (*_COEFFS, "source", "fit_info") if k in data})
        return replace(model, row_residual_s=tuple(float(v) for v in data.get("row_residual_s", ())))


def load_cost_model(path: str | Path | None) -> CostModel:
    """The cost model in a JSON file written by ``benchmarks/calibrate.py``, or the default."""
    return CostModel() if path is None else CostModel.from_json(path)
