"""The batched sampler: turns one step's logits into one next token per sequence.

Order of processing (vLLM-like), each step skipped when no row of the batch needs it:
  1. min_tokens      -- eos and stop_token_ids get -inf while the output is too short
  2. repetition      -- HF semantics over prompt + output tokens
  3. presence/frequency penalties -- OpenAI semantics over output tokens, then logit_bias
     (added) and allowed_token_ids (every other token gets -inf), then the grammar masks of
     structured-output rows (one batched bitmask over those rows only)
  4. greedy rows take the argmax here; the others go on:
  5. temperature, then top-k, top-p (one sort for both), then min-p
  6. exponential race: argmax(probs / q) with q ~ Exp(1) drawn for the full vocabulary, which
     samples exactly from probs. Rows with their own generator draw q from it, so a seeded
     request gets the same tokens whatever else shares the batch.
All steps are batched tensor ops; the only per-row loop over tensors is the seeded noise draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from engine.logprobs import chosen_logprobs, top_logprobs
from engine.penalties import (apply_logit_bias, apply_presence_frequency_penalties, apply_repetition_penalty,
                              keep_only_tokens, mask_tokens_)
from engine.sampling_params import SamplingParams
from engine.structured_output.bitmask import apply_grammar_masks
from engine.structured_output.grammar_state import GrammarState

# Below this a temperature is treated as greedy: dividing logits by it would overflow.
_MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingRow:
    """One row of the logits: the sequence it belongs to and its history."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Per-request generator, created by the engine when params.seed is set. It must live on
    # the logits' device.
    generator: torch.Generator | None = None
    # The sequence's grammar when its output is constrained (engine/structured_output/).
    grammar: GrammarState | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: chosen token + top-n ids -> logprob (raw distribution); None when not requested.
    logprobs: list[dict[int, float] | None]
    # Logprob of each chosen token under the raw distribution; NaN for every row when no row of
    # the batch asked for logprobs (it costs a logsumexp over the whole vocabulary).
    chosen_logprobs: list[float]


class Sampler:
    """Stateless apart from the eos ids; one instance serves every step."""

    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = set(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """`logits` `[N, V]` raw model output, one row per entry of `rows`. It is never
        modified. Returns one token per row."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        raw = logits if logits.dtype == torch.float32 else logits.float()
        penalized = self.penalize(raw, rows)
        tokens = self._pick(penalized, rows)
        wanted = [r.params.logprobs for r in rows]
        # a log-softmax over the whole vocabulary is a real cost per step: only when asked
        if any(w is not None for w in wanted):
            chosen = chosen_logprobs(raw, tokens).tolist()
        else:
            chosen = [math.nan] * len(rows)
        return SamplerOutput(
            token_ids=tokens.tolist(),
            logprobs=top_logprobs(raw, tokens, wanted),
            chosen_logprobs=chosen,
        )

    def needs_only_argmax(self, rows: list[SamplingRow]) -> list[bool]:
        """Per row: True when `__call__` would return argmax of the raw logits for it and read
        nothing else from them (greedy, no logprobs, none of steps 1-3), so a head that yields
        only the argmax (engine/models/greedy_head.py) may stand in for the full logits."""
        return [r.params.temperature < _MIN_TEMPERATURE and r.params.logprobs is None
                and len(r.output_token_ids) >= r.params.min_tokens and r.params.repetition_penalty == 1.0
                and not r.params.presence_penalty and not r.params.frequency_penalty
                and not r.params.logit_bias and not r.params.allowed_token_ids and r.grammar is None
                for r in rows]

    def penalize(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Steps 1-3 (min_tokens, repetition, presence/frequency, logit_bias, allowed_token_ids).
        Returns `logits` itself when
        no row uses any of them, else a new tensor; `logits` is never modified."""
        original = logits
        blocked_rows, blocked_ids = [], []
        vocab = logits.shape[1]
        for i, r in enumerate(rows):
            p = r.params
            if len(r.output_token_ids) < p.min_tokens:
                ids = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | self.eos_token_ids
                blocked_rows.append(i)
                # ids past the logits can never be sampled, so there is nothing to block (the
                # engine refuses such stop_token_ids; an eos id past them would be a model quirk)
                blocked_ids.append(sorted(t for t in ids if t < vocab))
        if blocked_rows:
            logits = logits.clone()
            mask_tokens_(logits, blocked_rows, blocked_ids)

        rep = [r.params.repetition_penalty for r in rows]
        if any(x != 1.0 for x in rep):
            seen = [r.prompt_token_ids + r.output_token_ids if x != 1.0 else []
                    for r, x in zip(rows, rep)]
            logits = apply_repetition_penalty(logits, seen, rep)

        pres = [r.params.presence_penalty for r in rows]
        freq = [r.params.frequency_penalty for r in rows]
        if any(pres) or any(freq):
            outputs = [r.output_token_ids if (p or f) else [] for r, p, f in zip(rows, pres, freq)]
            logits = apply_presence_frequency_penalties(logits, outputs, pres, freq)

        biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
        if biased:
            logits = apply_logit_bias(logits, biased, [rows[i].params.logit_bias for i in biased])
        limited = [i for i, r in enumerate(rows) if r.params.allowed_token_ids]
        if limited:
            logits = keep_only_tokens(logits, limited, [rows[i].params.allowed_token_ids for i in limited])
        constrained = [i for i, r in enumerate(rows) if r.grammar is not None and r.grammar.error is None]
        if constrained:
            if logits is original:
                logits = logits.clone()
            apply_grammar_masks(logits, constrained, [rows[i].grammar for i in constrained],
                                [rows[i].output_token_ids for i in constrained])
        return logits

    def _pick(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Steps 4-6: `[N]` int64 token ids."""
        greedy = [r.params.temperature < _MIN_TEMPERATURE for r in rows]
        if all(greedy):
            return logits.argmax(dim=1)
        random_idx = [i for i, g in enumerate(greedy) if not g]
        random_rows = [rows[i] for i in random_idx]
        if len(random_idx) == len(rows):
            return self._sample(logits, random_rows)
        idx = torch.tensor(random_idx, device=logits.device)
        tokens = logits.argmax(dim=1)
        tokens[idx] = self._sample(logits.index_select(0, idx), random_rows)
        return tokens

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Random sampling for rows that all have temperature > 0."""
        n, vocab = logits.shape
        dev = logits.device
        temps = [r.params.temperature for r in rows]
        if any(t != 1.0 for t in temps):
            logits = logits / torch.tensor(temps, dtype=logits.dtype, device=dev).unsqueeze(1)
        logits = _top_k_top_p(logits, [r.params.top_k for r in rows], [r.params.top_p for r in rows])
        probs = torch.softmax(logits, dim=1)
        min_p = [r.params.min_p for r in rows]
        if any(min_p):
            # min-p keeps tokens with prob >= min_p * max prob. The race below does not need
            # normalized probabilities, so dropped tokens are just zeroed.
            thresh = torch.tensor(min_p, dtype=probs.dtype, device=dev).unsqueeze(1)
            thresh = thresh * probs.amax(dim=1, keepdim=True)
            probs = probs.masked_fill(probs < thresh, 0.0)
        return probs.div_(_exponential_noise(n, vocab, rows, dev)).argmax(dim=1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Sets logits outside each row's top-k / nucleus to -inf (k=0 and p=1 mean off).

    Ties at the k-th value are all kept. Top-p keeps a token when the mass of the strictly more
    likely tokens is below p, i.e. the smallest set reaching p, and always at least one token."""
    vocab = logits.shape[1]
    use_k = any(k > 0 for k in top_k)
    use_p = any(p < 1.0 for p in top_p)
    if not (use_k or use_p):
        return logits
    dev = logits.device
    sorted_logits, order = logits.sort(dim=1)  # ascending: the kept tokens sit at the end
    if use_k:
        k = torch.tensor([min(x, vocab) if x > 0 else vocab for x in top_k], device=dev)
        kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if use_p:
        cum = sorted_logits.softmax(dim=1).cumsum(dim=1)
        p = torch.tensor(top_p, dtype=cum.dtype, device=dev).unsqueeze(1)
        drop = cum <= 1.0 - p
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _exponential_noise(n: int, vocab: int, rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """`[n, vocab]` Exp(1) noise; a row with a generator takes its whole row from it."""
    q = torch.empty(n, vocab, device=device)
    seeded = [i for i, r in enumerate(rows) if r.generator is not None]
    if len(seeded) < n:
        q.exponential_()  # one batched draw; seeded rows are overwritten below
    for i in seeded:
        q[i].exponential_(generator=rows[i].generator)
    # Exp(1) can round to 0 in float32; 0 would turn probs / q into inf or nan.
    return q.clamp_min_(torch.finfo(q.dtype).tiny)
