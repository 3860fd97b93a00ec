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
from engine.models.greedy_head import _OUTLIER_FACTOR, _SLACK, GreedyHead, fused_available, unsupported_reason
from tests.checkpoints import load_reference, make_tiny_checkpoint
from tests.test_engine import random_prompts

pytestmark = pytest.mark.skipif(int8_linear.unsupported_reason() is not None,
                                reason=f"{int8_linear.unsupported_reason()}")
# both implementations of the per-call work: plain torch, and the C++ ops of greedy_screen.cpp
PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(not fused_available(), reason="no C++ CPU kernels"))]


def _case(seed: int, vocab: int = 3000, hidden: int = 64, rows: int = 12):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, hidden, generator=gen) * 0.1
    x = torch.randn(rows, hidden, generator=gen) * (1 + seed % 5)
    x[0, seed % hidden] *= 30  # an outlier channel
    return w, x


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("outliers", [0, 4, 32])
def test_screened_argmax_equals_full_argmax(seed, outliers, fused):
    w, x = _case(seed)
    head = GreedyHead(w, outliers=outliers, fused=fused)
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


@pytest.mark.parametrize("fused", PATHS)
def test_ties_and_near_ties(fused):
    w, x = _case(7)
    best = F.linear(x, w).argmax(dim=1)
    # row 0: its winner duplicated at a lower index -> the lower index wins (exact tie)
    # row 1: a copy 1e-4 larger at a lower index -> that one wins (a near tie far below the bound)
    # row 2: a copy 1e-4 smaller at a lower index -> the original keeps winning
    w[3] = w[best[0]]
    w[9] = w[best[1]] * (1 + 1e-4)
    w[11] = w[best[2]] * (1 - 1e-4)
    logits = F.linear(x, w)
    res = GreedyHead(w, outliers=8, fused=fused).screen(x)
    assert res.tokens[0] == 3
    assert res.tokens[1] == 9
    assert res.tokens[2] == best[2]
    assert torch.equal(res.tokens, logits.argmax(dim=1))
    assert bool((res.candidates[:3] >= 2).all())  # the ties were decided by the recompute
    # a head of identical rows: every logit ties, the first one wins
    same = GreedyHead(w[:1].repeat(50, 1), fused=fused).screen(x)
    assert bool((same.tokens == 0).all())


@pytest.mark.parametrize("fused", PATHS)
def test_fallback_rows_and_non_finite_rows(fused):
    w, x = _case(8)
    x[4] = 0.0  # all logits 0: every token is a candidate
    x[6, 2] = float("nan")
    want = F.linear(x, w).argmax(dim=1)
    res = GreedyHead(w, max_candidates=1, fused=fused).screen(x)
    assert torch.equal(res.tokens, want)
    assert bool(res.fallback[4]) and bool(res.fallback[6]) and res.tokens[4] == 0
    assert not bool(res.fallback.all())  # rows with one candidate were still screened


@pytest.mark.parametrize("fused", PATHS)
def test_pauses_when_screening_does_not_pay(fused):
    w, x = _case(9)
    head = GreedyHead(w, max_candidates=0, fused=fused)  # every row falls back
    want = F.linear(x, w).argmax(dim=1)
    for _ in range(10):
        assert torch.equal(head.argmax(x), want)
    assert head._skip > 0  # now on the full head for a while: the same tokens
    assert torch.equal(head.argmax(x), want)
    assert head.argmax(x[:0]).shape == (0,)


def _rounding_ties(k: int, rows: int = 24, vocab: int = 900):
    """Rows whose two best tokens p < q have equal exact logits: w_q is w_p with coordinates i, j
    swapped and x_i = x_j, so only the float32 summation order separates them."""
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(vocab, k, generator=gen) * 0.05
    x = torch.randn(rows, k, generator=gen) * torch.logspace(-2, 1, k)[torch.randperm(k, generator=gen)]
    for r in range(rows):
        i, j = torch.randperm(k, generator=gen)[:2].tolist()
        x[r, j] = x[r, i]
        p, q = 2 * r + 1, 2 * r + 100
        w[p] = x[r] * 0.3 + torch.randn(k, generator=gen) * 0.01
        w[q] = w[p]
        w[q, i], w[q, j] = w[p, j], w[p, i]
    return w, x


@pytest.mark.skipif(not fused_available(), reason="no C++ CPU kernels")
@pytest.mark.parametrize("k", [5, 40, 64, 576])
def test_paths_agree_where_rounding_decides(k):
    """The C++ op recomputes the candidates' logits in torch's summation order: bitwise the torch
    path's logits, so the same token even where only rounding separates two tokens."""
    w, x = _rounding_ties(k)
    z = torch.stack([(w * row).sum(dim=1) for row in x])  # the torch path's float32 logits
    rows = torch.arange(x.shape[0])
    decided = z[rows, 2 * rows + 1] != z[rows, 2 * rows + 100]
    assert bool(decided.any())  # the case is real: some pairs differ in the last bit
    for fused in (False, True):
        res = GreedyHead(w, outliers=4, fused=fused).screen(x)
        assert not bool(res.fallback.any())
        assert torch.equal(res.tokens, z.argmax(dim=1))


@pytest.mark.skipif(not fused_available(), reason="no C++ CPU kernels")
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_paths_agree_on_batches_with_outliers(rows):
    w, x = _case(rows, vocab=5000, hidden=96, rows=rows)
    x[:, 3] *= 25  # an outlier channel in every row, and one more in the last row
    x[-1, 50] = -400.0
    torch_res = GreedyHead(w, fused=False).screen(x)
    fused_res = GreedyHead(w, fused=True).screen(x)
    assert torch.equal(fused_res.tokens, torch_res.tokens)
    assert torch.equal(fused_res.tokens, F.linear(x, w).argmax(dim=1))
    assert not bool(fused_res.fallback.any())
    assert int((fused_res.candidates - torch_res.candidates).abs().max()) <= 1  # bounds equal to rounding


@pytest.mark.skipif(not int8_linear.own_gemm_available(), reason="no C++ CPU kernels")
@pytest.mark.parametrize("rows", [1, 4, 7, 32, 33])
def test_own_gemm_and_fbgemm_give_the_same_tokens(rows):
    """The fused path with our int8 GEMM (the default where built) and with fbgemm's (the
    fallback): the same tokens as the float32 head, bounds equal up to rounding; vocab 5001 is
    not a multiple of the GEMM's 32-token block; outlier channels split off."""
    w, x = _case(rows + 40, vocab=5001, hidden=96, rows=rows)
    x[:, 3] *= 25
    own_head = GreedyHead(w, fused=True)
    assert own_head.panels is not None  # the default where the op is built
    fb_head = GreedyHead(w, fused=True, own_gemm=False)
    assert fb_head.panels is None
    own_res, fb_res = own_head.screen(x), fb_head.screen(x)
    assert torch.equal(own_res.tokens, F.linear(x, w).argmax(dim=1))
    assert torch.equal(own_res.tokens, fb_res.tokens)
    assert not bool(own_res.fallback.any())
    assert int((own_res.candidates - fb_res.candidates).abs().max()) <= 1
    with pytest.raises(ValueError, match="int8_gemm.cpp"):
        GreedyHead(w, fused=False, own_gemm=True)


@pytest.mark.skipif(not fused_available(), reason="no C++ CPU kernels")
@pytest.mark.parametrize("outliers", [0, 8])
def test_fused_prepare_within_its_bound(outliers):
    """greedy_prepare's normalised rows, scales and coefficients: |x·w_n - a_n| <= coef · pieces_n
    (times the slack) against float64, with a formed as the C++ screen forms it."""
    w, x = _case(12, vocab=700, hidden=96, rows=9)
    x[2, :5] = -200.0
    head = GreedyHead(w, outliers=outliers, fused=True)
    inp, m, coef, chans, finite = torch.ops.conveyor_cpu.greedy_prepare(x, head.outliers, _OUTLIER_FACTOR)
    assert bool(finite.all()) and torch.equal(inp[-1, :2], torch.tensor([1.0, -1.0]))
    x_in = x.index_fill(1, chans, 0.0)
    want_xn, want_m = int8_linear.normalise_rows(x_in)
    assert torch.equal(inp[:-1], want_xn) and torch.equal(m, want_m)
    a = torch.ops.quantized.linear_dynamic(inp, head.int8.packed, True)[:-1] * m.unsqueeze(1)
    if len(chans):
        a += x[:, chans].double().matmul(head.dense_t[chans].double()).float()
    err = (x.double() @ w.double().T - a.double()).abs()
    assert bool((err <= (coef.double() @ head._pieces.double().T) * _SLACK).all())


@pytest.mark.parametrize("fused", PATHS)
def test_rows_that_could_overflow_fall_back(fused):
    w, x = _case(13)
    x[2] = x[2].sign() * 3e38  # x·w overflows float32
    x[3] *= 1e36
    res = GreedyHead(w, fused=fused).screen(x)
    assert bool(res.fallback[2]) and not bool(res.fallback[0])
    assert torch.equal(res.tokens[[0, 1, 4, 5]], F.linear(x, w).argmax(dim=1)[[0, 1, 4, 5]])
    assert torch.equal(res.tokens, GreedyHead(w, fused=False).screen(x).tokens)


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
