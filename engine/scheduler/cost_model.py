"""How long one engine step takes, as a function of what the scheduler put into it.

The simulator replaces the model with this formula:

    step_seconds = base_s + per_token_s * num_batched_tokens
                          + per_context_token_s * sum_context + per_seq_s * num_seqs

``num_batched_tokens`` are the new tokens fed this step (prefill chunks + one per decode),
``sum_context`` is the sum over scheduled sequences of their length after the step (what
attention reads), and ``num_seqs`` is the batch size. ``fit`` finds the four coefficients by
least squares from steps measured on the real engine (``benchmarks/calibrate.py``), keeping them
non-negative so a fitted model never predicts a step that gets faster as it grows.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

_COEFFS = ("base_s", "per_token_s", "per_context_token_s", "per_seq_s")


@dataclass(frozen=True)
class StepSample:
    """One measured step of the real engine."""

    num_batched_tokens: int
    sum_context: int
    num_seqs: int
    seconds: float


@dataclass(frozen=True)
class CostModel:
    """Step time in seconds; all coefficients are >= 0 (checked at construction)."""

    base_s: float = 0.030
    per_token_s: float = 0.00025
    per_context_token_s: float = 0.000002
    per_seq_s: float = 0.002
    source: str = "built-in default (illustrative numbers, not a measurement: calibrate for predictions)"
    fit_info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in _COEFFS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")

    def step_time(self, num_batched_tokens: int, sum_context: int, num_seqs: int) -> float:
        return (self.base_s + self.per_token_s * num_batched_tokens
                + self.per_context_token_s * sum_context + self.per_seq_s * num_seqs)

    # -- fitting ------------------------------------------------------------------------------
    @classmethod
    def fit(cls, samples: list[StepSample], source: str = "fitted") -> "CostModel":
        """Non-negative least squares over the samples (needs at least 4 of them).

        The fit drops any coefficient that comes out negative and refits the rest (a tiny
        active-set NNLS; four unknowns make it exact enough). ``fit_info`` records the number
        of samples and the mean absolute relative error of the fit on them.
        """
        if len(samples) < len(_COEFFS):
            raise ValueError(f"samples must hold at least {len(_COEFFS)} steps, got {len(samples)}")
        x = np.array([[1.0, s.num_batched_tokens, s.sum_context, s.num_seqs] for s in samples])
        y = np.array([s.seconds for s in samples])
        active = list(range(len(_COEFFS)))
        coef = np.zeros(len(_COEFFS))
        while active:
            sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
            if (sol >= 0).all():
                coef[:] = 0
                coef[active] = sol
                break
            active.pop(int(np.argmin(sol)))  # drop the most negative term and refit
        pred = x @ coef
        rel_err = float(np.mean(np.abs(pred - y) / np.maximum(y, 1e-9)))
        info = {"num_samples": len(samples), "mean_abs_rel_error": rel_err}
        return cls(*(float(c) for c in coef), source=source, fit_info=info)

    # -- files --------------------------------------------------------------------------------
    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "CostModel":
        data = json.loads(Path(path).read_text())
        missing = [k for k in _COEFFS if k not in data]
        if missing:
            raise ValueError(f"cost model file {path} lacks the field {missing[0]!r}")
        return cls(**{k: data[k] for k in (*_COEFFS, "source", "fit_info") if k in data})


def load_cost_model(path: str | Path | None) -> CostModel:
    """The cost model in a JSON file written by ``benchmarks/calibrate.py``, or the default."""
    return CostModel() if path is None else CostModel.from_json(path)
