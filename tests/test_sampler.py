import math

import pytest
import torch

from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams

EOS = 2
# CUDA runs too where a GPU is present: generators, noise and scatters are device-specific.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def row(prompt=(1,), output=(), generator=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), generator)


def crafted_logits() -> tuple[torch.Tensor, list[int]]:
    """Logits of a known distribution over 10 tokens, in shuffled order. Returns the logits and
    the token ids sorted from most to least likely."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.01, 0.005, 0.003, 0.002])
    perm = torch.randperm(10)
    logits = torch.empty(10)
    logits[perm] = probs.log() + 1.7  # a constant shift changes nothing
    return logits, perm.tolist()


def draw_many(logits: torch.Tensor, draws: int, device: str = "cpu", **params) -> list[int]:
    """Samples `draws` times from one distribution, as one batch of identical rows."""
    batch = logits.to(device).unsqueeze(0).expand(draws, -1)  # a view, like the engine may pass
    return Sampler({EOS})(batch, [row(**params) for _ in range(draws)]).token_ids


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_in_a_mixed_batch(device):
    logits = torch.randn(6, 50, device=device)
    rows = [row(temperature=0.0) if i % 2 == 0 else row(temperature=1.0) for i in range(6)]
    out = Sampler({EOS})(logits, rows)
    expected = logits.argmax(dim=1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]
    assert Sampler({EOS})(logits, [row(temperature=0.0)] * 6).token_ids == expected


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_1_is_greedy(device):
    logits = torch.randn(8, 100, device=device)
    out = Sampler({EOS})(logits, [row(temperature=1.3, top_k=1) for _ in range(8)])
    assert out.token_ids == logits.argmax(dim=1).tolist()


@pytest.mark.parametrize("params,allowed_ranks", [
    (dict(top_k=3), [0, 1, 2]),
    (dict(top_p=0.7), [0, 1, 2]),  # 0.4 + 0.25 < 0.7 <= 0.4 + 0.25 + 0.15
    (dict(min_p=0.2), [0, 1, 2, 3]),  # keeps p >= 0.08
    (dict(top_k=4, top_p=0.7), [0, 1]),  # after top-k, 0.4/0.9 + 0.25/0.9 >= 0.7
    (dict(top_p=0.7, temperature=0.5), [0, 1]),  # sharper: p^2 / sum gives 0.62, 0.24, ...
    (dict(top_p=0.6, temperature=0.5), [0]),
])
@pytest.mark.parametrize("device", DEVICES)
def test_truncation_never_samples_outside_the_allowed_set(params, allowed_ranks, device):
    logits, order = crafted_logits()
    tokens = draw_many(logits, 3000, device, **params)
    allowed = {order[r] for r in allowed_ranks}
    assert set(tokens) == allowed  # nothing outside, and every allowed token shows up


def test_temperature_sampling_frequencies_follow_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 0.8, -2.0])
    draws, temperature = 6000, 0.7
    tokens = torch.tensor(draw_many(logits, draws, temperature=temperature))
    observed = torch.bincount(tokens, minlength=5).double()
    expected = torch.softmax(logits.double() / temperature, dim=0) * draws
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0, (observed, expected)  # df=4: p ~ 5e-5 by chance


def run_steps(seed: int, position: int, others: list[SamplingRow], device: str, steps: int = 5) -> list[int]:
    """Tokens of one seeded row over several steps, placed at `position` among `others`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    seeded = row(generator=gen, seed=seed, temperature=0.9, top_p=0.95)
    tokens = []
    for _ in range(steps):
        rows = others[:position] + [seeded] + others[position:]
        logits = torch.randn(len(rows), 1000, device=device)
        logits[position] = torch.linspace(-1.0, 1.0, 1000, device=device)
        tokens.append(Sampler({EOS})(logits, rows).token_ids[position])
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_is_independent_of_the_batch(device):
    batch_a = [row(temperature=1.0), row(temperature=0.5, top_k=10)]
    batch_b = [row(temperature=0.0), row(min_p=0.1),
               row(generator=torch.Generator(device=device).manual_seed(1)), row(temperature=2.0)]
    first = run_steps(seed=123, position=0, others=batch_a, device=device)
    assert run_steps(seed=123, position=3, others=batch_b, device=device) == first
    assert run_steps(seed=123, position=0, others=[], device=device) == first
    assert run_steps(seed=124, position=1, others=batch_a, device=device) != first


def reference_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Straightforward per-row, per-token version of the penalties."""
    out = logits.clone()
    for i, r in enumerate(rows):
        p = r.params
        for t in set(r.prompt_token_ids + r.output_token_ids):
            value = out[i, t].item()
            out[i, t] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for t in set(r.output_token_ids):
            count = r.output_token_ids.count(t)
            out[i, t] -= p.frequency_penalty * count + p.presence_penalty
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_reference(device):
    logits = torch.randn(5, 40, device=device) * 3
    rows = [
        row(prompt=[3, 4, 5, 3], output=[7, 7, 8], repetition_penalty=1.3),
        row(prompt=[1], output=[9, 9, 9, 2, 10], presence_penalty=0.7, frequency_penalty=0.4),
        row(prompt=[0, 39, 12], output=[12, 12, 5], repetition_penalty=0.8, presence_penalty=-1.0,
            frequency_penalty=1.5),
        row(prompt=[6, 6], output=[6, 7]),  # no penalty: must come out unchanged
        row(prompt=[], output=[], repetition_penalty=1.5, frequency_penalty=2.0),
    ]
    original = logits.clone()
    penalized = Sampler({EOS}).penalize(logits, rows)
    torch.testing.assert_close(penalized, reference_penalties(logits, rows))
    assert torch.equal(logits, original)  # the input is never modified
    greedy_rows = [SamplingRow(SamplingParams(**{**vars(r.params), "temperature": 0.0, "stop": None,
                                                  "stop_token_ids": None}),
                               r.prompt_token_ids, r.output_token_ids) for r in rows]
    tokens = Sampler({EOS})(logits, greedy_rows).token_ids
    assert tokens == reference_penalties(logits, rows).argmax(dim=1).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_blocks_eos_and_stop_token_ids(device):
    logits = torch.randn(4, 20, device=device)
    logits[:, EOS] = 50.0
    logits[:, 11] = 40.0
    rows = [
        row(output=[5, 6], min_tokens=3, temperature=0.0),  # too short: eos blocked
        row(output=[5, 6], min_tokens=3, stop_token_ids=[11]),  # too short: 11 blocked too
        row(output=[5, 6, 7], min_tokens=3, temperature=0.0),  # long enough: eos allowed
        row(output=[], min_tokens=2, ignore_eos=True, stop_token_ids=[11], temperature=0.0),
    ]
    original = logits.clone()
    tokens = Sampler({EOS})(logits, rows).token_ids
    assert tokens[0] == 11
    assert tokens[1] not in (EOS, 11)
    assert tokens[2] == EOS
    assert tokens[3] == EOS  # ignore_eos: eos does not end the sequence, so it is not masked
    assert torch.equal(logits, original)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_come_from_the_raw_distribution(device):
    vocab = 20
    logits = torch.randn(4, vocab, device=device) * 2
    rows = [
        row(logprobs=3, temperature=0.5, repetition_penalty=1.7, output=[1, 2, 3]),
        row(logprobs=0),
        row(),
        row(logprobs=vocab, temperature=0.0, presence_penalty=1.0, output=[4]),
    ]
    out = Sampler({EOS})(logits, rows)
    ref = torch.log_softmax(logits, dim=1)
    assert out.logprobs[2] is None
    for i, entry in enumerate(out.logprobs):
        chosen = out.token_ids[i]
        assert math.isclose(out.chosen_logprobs[i], ref[i, chosen].item(), abs_tol=1e-5)
        if entry is None:
            continue
        assert chosen in entry
        n = rows[i].params.logprobs
        top = ref[i].topk(n).indices.tolist()  # most likely first
        assert list(entry) == [chosen] + [t for t in top if t != chosen]
        values = [entry[t] for t in top]
        assert values == sorted(values, reverse=True)
        for t, value in entry.items():
            assert math.isclose(value, ref[i, t].item(), abs_tol=1e-5)
    assert out.logprobs[1] == {out.token_ids[1]: pytest.approx(ref[1, out.token_ids[1]].item(), abs=1e-5)}
    full = out.logprobs[3]
    assert len(full) == vocab
    assert math.isclose(sum(math.exp(v) for v in full.values()), 1.0, abs_tol=1e-5)


def test_bad_logits_shape_raises():
    with pytest.raises(ValueError, match="logits"):
        Sampler({EOS})(torch.randn(3, 10), [row(), row()])


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_logits_are_sampled_in_float32(device):
    logits = torch.randn(3, 64, device=device).to(torch.bfloat16)
    rows = [row(temperature=0.0, logprobs=2), row(temperature=0.8, top_p=0.9), row(min_p=0.05)]
    out = Sampler({EOS})(logits, rows)
    assert out.token_ids[0] == logits.float()[0].argmax().item()
    ref = torch.log_softmax(logits.float(), dim=1)
    for i, t in enumerate(out.token_ids):
        assert math.isclose(out.chosen_logprobs[i], ref[i, t].item(), abs_tol=1e-5)


def test_min_tokens_ignores_ids_past_the_vocabulary():
    """Defense in depth: an out-of-range stop id (the engine refuses them) must not raise
    IndexError on the engine thread."""
    logits = torch.randn(1, 40)
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5, 40, 10 ** 12])
    out = Sampler({EOS}).penalize(logits, [SamplingRow(params, [1], [])])
    assert out[0, 5] == float("-inf") and out[0, EOS] == float("-inf")
    kept = [t for t in range(40) if t not in (5, EOS)]
    assert torch.equal(out[0, kept], logits[0, kept])


@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias_and_allowed_token_ids(device):
    logits = torch.randn(4, 40, device=device)
    rows = [
        row(logit_bias={3: 5.0, 7: -100.0}),
        row(allowed_token_ids=[11, 12, 13]),
        row(),  # untouched
        row(logit_bias={12: 100.0}, allowed_token_ids=[5, 12], repetition_penalty=1.5, prompt=[12]),
    ]
    original = logits.clone()
    out = Sampler({EOS}).penalize(logits, rows)
    assert torch.equal(logits, original)
    expected = logits.clone()
    expected[0, 3] += 5.0
    expected[0, 7] -= 100.0
    keep = torch.full((40,), float("-inf"), device=device)
    keep[[11, 12, 13]] = logits[1, [11, 12, 13]]
    expected[1] = keep
    rep = logits[3, 12] / 1.5 if logits[3, 12] > 0 else logits[3, 12] * 1.5
    third = torch.full((40,), float("-inf"), device=device)
    third[5], third[12] = logits[3, 5], rep + 100.0
    expected[3] = third
    torch.testing.assert_close(out, expected)
    # sampling honours them: only allowed ids come out, and a +100 bias wins
    for _ in range(5):
        tokens = Sampler({EOS})(logits, rows).token_ids
        assert tokens[1] in (11, 12, 13) and tokens[3] == 12


def test_logit_bias_and_allowed_ids_are_validated():
    from engine.errors import InvalidParameterError
    from engine.sampling_params import RequestLimits

    for bad in ({-1: 1.0}, {"5": 1.0}, {5: 101.0}, {5: float("nan")}, [5]):
        with pytest.raises(InvalidParameterError) as info:
            SamplingParams(logit_bias=bad)
        assert info.value.param == "logit_bias"
    for bad in ([], [-1], "5", [1.5]):
        with pytest.raises(InvalidParameterError) as info:
            SamplingParams(allowed_token_ids=bad)
        assert info.value.param == "allowed_token_ids"
    limits = RequestLimits(vocab_size=40)
    SamplingParams(logit_bias={39: 1}, allowed_token_ids=[0, 39]).verify(limits)
    for field, value in (("logit_bias", {40: 1.0}), ("allowed_token_ids", [3, 40])):
        with pytest.raises(InvalidParameterError) as info:
            SamplingParams(**{field: value}).verify(limits)
        assert info.value.param == field and "[0, 40)" in str(info.value)
