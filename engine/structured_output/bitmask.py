"""Applies the grammars of one step's constrained rows to the logits, in one batched call."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.structured_output.grammar_state import GrammarState


def apply_grammar_masks(logits: torch.Tensor, rows: Sequence[int], states: Sequence[GrammarState],
                        outputs: Sequence[list[int]]) -> None:
    """Sets to -inf, in place, every logit of row `rows[j]` that `states[j]` forbids after the
    sequence's output `outputs[j]`. Rows not listed are untouched (unconstrained requests pay
    nothing but the batch's share of this one call)."""
    import xgrammar as xgr  # noqa: PLC0415

    chosen = []
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for row, state, out in zip(rows, states, outputs):
        state.sync(out)
        if state.broken:
            continue
        state.fill(bitmask, row)
        chosen.append(row)
    if chosen:
        if logits.device.type != "cpu":
            bitmask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=chosen)
