"""Logit adjustments that depend on a sequence's history: min_tokens, repetition, presence and
frequency penalties. Each function works on a whole batch at once (one scatter per kind of
history, no per-row tensor ops). Rows that do not use a penalty come out exactly unchanged; the
sampler skips a function altogether when no row of the batch uses it.
"""
from __future__ import annotations

import torch


def pad_token_lists(token_lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """`[N, L]` int64 tensor of the lists, right-padded with `pad` (L >= 1 so scatters work)."""
    width = max(1, max((len(t) for t in token_lists), default=0))
    return torch.tensor([t + [pad] * (width - len(t)) for t in token_lists],
                        dtype=torch.long, device=device)


def token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """`[N, V]` float tensor: how often each token id occurs in each row's list.

    Padding goes to an extra column V that is dropped, so one scatter_add covers the batch."""
    padded = pad_token_lists(token_lists, vocab_size, device)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def mask_tokens_(logits: torch.Tensor, rows: list[int], token_ids: list[list[int]]) -> None:
    """In place: sets `logits[rows[i], token_ids[i]]` to -inf (used for min_tokens)."""
    row_idx = [r for r, ids in zip(rows, token_ids) for _ in ids]
    col_idx = [t for ids in token_ids for t in ids]
    if not row_idx:
        return
    dev = logits.device
    logits[torch.tensor(row_idx, device=dev), torch.tensor(col_idx, device=dev)] = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, seen_tokens: list[list[int]],
                             penalties: list[float]) -> torch.Tensor:
    """HF semantics: for every token id already seen by a row (prompt or output), a positive
    logit is divided by the row's penalty and a negative one multiplied. Rows with penalty 1.0
    come out exactly unchanged. Returns a new tensor."""
    vocab = logits.shape[1]
    seen = token_counts(seen_tokens, vocab, logits.device) > 0
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device).unsqueeze(1)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency_penalties(logits: torch.Tensor, output_tokens: list[list[int]],
                                       presence: list[float], frequency: list[float]) -> torch.Tensor:
    """OpenAI semantics over the generated tokens only:
    `logit[t] -= frequency * count[t] + presence * (count[t] > 0)`. Returns a new tensor."""
    counts = token_counts(output_tokens, logits.shape[1], logits.device)
    dev, dt = logits.device, logits.dtype
    freq = torch.tensor(frequency, dtype=dt, device=dev).unsqueeze(1)
    pres = torch.tensor(presence, dtype=dt, device=dev).unsqueeze(1)
    return logits - freq * counts - pres * (counts > 0).to(dt)


def apply_logit_bias(logits: torch.Tensor, rows: list[int], biases: list[dict[int, float]]) -> torch.Tensor:
    """OpenAI's logit_bias: adds `biases[i][t]` to `logits[rows[i], t]`. Returns a new tensor;
    other rows and tokens come out exactly unchanged."""
    row_idx = [r for r, b in zip(rows, biases) for _ in b]
    col_idx = [t for b in biases for t in b]
    values = [v for b in biases for v in b.values()]
    out = logits.clone()
    dev = logits.device
    out.index_put_((torch.tensor(row_idx, device=dev), torch.tensor(col_idx, device=dev)),
                   torch.tensor(values, dtype=logits.dtype, device=dev), accumulate=True)
    return out


def keep_only_tokens(logits: torch.Tensor, rows: list[int], token_ids: list[list[int]]) -> torch.Tensor:
    """allowed_token_ids: in each of `rows`, every logit except those of `token_ids[i]` (each
    list non-empty) becomes -inf. Returns a new tensor; other rows come out unchanged."""
    width = max(len(ids) for ids in token_ids)
    dev = logits.device
    # each row is padded with its own first id: a repeated index keeps the same logit
    keep = torch.tensor([ids + ids[:1] * (width - len(ids)) for ids in token_ids], dtype=torch.long, device=dev)
    idx = torch.tensor(rows, device=dev)
    sub = logits.index_select(0, idx)
    masked = torch.full_like(sub, float("-inf")).scatter_(1, keep, sub.gather(1, keep))
    out = logits.clone()
    out[idx] = masked
    return out
