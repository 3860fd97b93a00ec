"""engine/models/greedy_head.py: the screened argmax equals the float32 argmax (lowest index on
ties), on random heads, constructed near ties, exact ties and the fallback path; and the engine
with it gives the same greedy tokens as transformers and as itself with screening off, also in
batches mixing greedy rows with sampled / logprob / penalised rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.kernels import int8_linear
from engine.models.greedy_head import GreedyHead, unsupported_reason
from tests.checkpoints import load_reference, make_tiny_checkpoint
from tests.test_engine import random_prompts

pytestmark = pytest.mark.skipif(int8_linear.unsupported_reason() is not None,
                                reason=f"{int8_linear.unsupported_reason()}")


def _case(seed: int, vocab: int = 3000, hidden: int = 64, rows: int = 12):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, hidden, generator=gen) * 0.1
    x = torch.randn(rows, hidden, generator=gen) * (1 + seed % 5)
    x[0, seed % hidden] *= 30  # an outlier channel
    return w, x


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("outliers", [0, 4, 32])
def test_screened_argmax_equals_full_argmax(seed, outliers):
    w, x = _case(seed)
    head = GreedyHead(w, outliers=outliers)
    res = head.screen(x)
    assert torch.equal(res.tokens, F.linear(x, w).argmax(dim=1))
    assert not bool(res.fallback.any()) and int(res.candidates.max()) < 1024
    for i in (0, 5):  # a row alone gives the same token
        assert torch.equal(head.argmax(x[i:i + 1]), res.tokens[i:i + 1])


@pytest.mark.parametrize("outliers", [0, 3, 32])
def test_split_approximation_within_its_bound(outliers):
    """Step 1 with outlier channels split off: |x·w_n - a_n| <= B_n against float64."""
    w, x = _case(11, vocab=700, hidden=96, rows=9)
    x[2, :5] = -200.0  # several outliers in one row
    head = GreedyHead(w, outliers=outliers)
    a, coef = head._approx(x)
    bound = coef.double() @ head._pieces.double().T
    err = (x.double() @ w.double().T - a.double()).abs()
    assert bool((err <= bound.double()).all())


def test_ties_and_near_ties():
    w, x = _case(7)
    best = F.linear(x, w).argmax(dim=1)
    # row 0: its winner duplicated at a lower index -> the lower index wins (exact tie)
    # row 1: a copy 1e-4 larger at a lower index -> that one wins (a near tie far below the bound)
    # row 2: a copy 1e-4 smaller at a lower index -> the original keeps winning
    w[3] = w[best[0]]
    w[9] = w[best[1]] * (1 + 1e-4)
    w[11] = w[best[2]] * (1 - 1e-4)
    logits = F.linear(x, w)
    res = GreedyHead(w, outliers=8).screen(x)
    assert res.tokens[0] == 3
    assert res.tokens[1] == 9
    assert res.tokens[2] == best[2]
    assert torch.equal(res.tokens, logits.argmax(dim=1))
    assert bool((res.candidates[:3] >= 2).all())  # the ties were decided by the recompute
    # a head of identical rows: every logit ties, the first one wins
    same = GreedyHead(w[:1].repeat(50, 1)).screen(x)
    assert bool((same.tokens == 0).all())


def test_fallback_rows_and_non_finite_rows():
    w, x = _case(8)
    x[4] = 0.0  # all logits 0: every token is a candidate
    x[6, 2] = float("nan")
    want = F.linear(x, w).argmax(dim=1)
    res = GreedyHead(w, max_candidates=1).screen(x)
    assert torch.equal(res.tokens, want)
    assert bool(res.fallback[4]) and bool(res.fallback[6]) and res.tokens[4] == 0
    assert not bool(res.fallback.all())  # rows with one candidate were still screened


def test_pauses_when_screening_does_not_pay():
    w, x = _case(9)
    head = GreedyHead(w, max_candidates=0)  # every row falls back
    want = F.linear(x, w).argmax(dim=1)
    for _ in range(10):
        assert torch.equal(head.argmax(x), want)
    assert head._skip > 0  # now on the full head for a while: the same tokens
    assert torch.equal(head.argmax(x), want)
    assert head.argmax(x[:0]).shape == (0,)


def test_unsupported_heads():
    assert "float32" in unsupported_reason(torch.zeros(4, 8, dtype=torch.float64))
    bad = torch.ones(4, 8)
    bad[1, 1] = float("inf")
    assert "non-finite" in unsupported_reason(bad)
    with pytest.raises(ValueError, match="greedy head screening is not available"):
        GreedyHead(bad)


def _hf_greedy(path: str, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Plain argmax over transformers' logits, no eos handling (ignore_eos on our side)."""
    model = load_reference(path)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(steps):
                nxt = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            out.append(ids[0, len(p):].tolist())
    return out


def _counting(head: GreedyHead) -> list:
    """Wraps head.screen to record each call's result (to see that screening really ran)."""
    seen, screen = [], head.screen
    head.screen = lambda x: seen.append(screen(x)) or seen[-1]
    return seen


@pytest.mark.parametrize("tied", [True, False])
def test_engine_greedy_matches_transformers_and_screening_off(tmp_path, tied):
    path = make_tiny_checkpoint(str(tmp_path / "llama"), "llama", tie_word_embeddings=tied)
    prompts = random_prompts(6, seed=3)
    steps = 8
    llm = LLM(path, dtype="float32", num_blocks=128)
    head = llm.engine.model.greedy_head
    assert head is not None and llm.engine.model.linear_backend in ("cpu", "onednn")  # the LM head is oneDNN in both
    seen = _counting(head)
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    on = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    screened = sum(int((~r.fallback).sum()) for r in seen)
    assert screened > 0.9 * sum(len(r.tokens) for r in seen)
    llm.engine.model.greedy_head = None
    off = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert on == off == _hf_greedy(path, prompts, steps)


def test_mixed_batch(tmp_path):
    path = make_tiny_checkpoint(str(tmp_path / "llama"), "llama")
    prompts = random_prompts(6, seed=4)
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=11, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0, logprobs=2, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, min_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    llm = LLM(path, dtype="float32", num_blocks=128)
    seen = _counting(llm.engine.model.greedy_head)
    on = llm.generate(prompts, params, use_tqdm=False)
    assert seen and all(len(r.tokens) <= 3 for r in seen)  # rows 0, 5 and (past min_tokens) 4
    llm.engine.model.greedy_head = None
    off = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(on, off):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    got, want = on[2].outputs[0].logprobs, off[2].outputs[0].logprobs
    assert [sorted(d) for d in got] == [sorted(d) for d in want]
    for d_got, d_want in zip(got, want):
        assert [d_got[t] for t in sorted(d_got)] == pytest.approx([d_want[t] for t in sorted(d_want)], abs=1e-4)
    assert on[0].outputs[0].logprobs is None


def test_sampler_predicate_names_what_needs_full_logits():
    from engine.sampler import Sampler, SamplingRow

    def row(output=(), grammar=None, **kw):
        params = SamplingParams(**{"temperature": 0.0, "repetition_penalty": 1.0, **kw})
        return SamplingRow(params, [5, 6], list(output), None, grammar)

    rows = [row(), row(temperature=0.7), row(logprobs=0), row(repetition_penalty=1.1),
            row(presence_penalty=0.5), row(frequency_penalty=0.5), row(logit_bias={3: 1.0}),
            row(allowed_token_ids=[3, 4]), row(min_tokens=2, output=[1]), row(min_tokens=2, output=[1, 2]),
            row(grammar=object()), row(repetition_penalty=None)]  # None resolves to 1.0
    assert Sampler({2}).needs_only_argmax(rows) == [True, False, False, False, False, False, False, False,
                                                    False, True, False, True]
