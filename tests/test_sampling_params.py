import pytest

from engine.sampling_params import SamplingParams


def test_defaults_and_normalization():
    p = SamplingParams(stop="###", top_k=-1, temperature=1, stop_token_ids=(5, 7))
    assert p.stop == ["###"]
    assert p.stop_token_ids == [5, 7]
    assert p.top_k == 0
    assert isinstance(p.temperature, float)
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert p.max_stop_str_len == 3


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy


def test_clone_is_independent():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[3], seed=4, logprobs=2)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("c")
    q.stop_token_ids.append(9)
    assert p.stop == ["a", "b"] and p.stop_token_ids == [3]


@pytest.mark.parametrize("field,value", [
    ("n", 0),
    ("n", "2"),
    ("max_tokens", 0),
    ("max_tokens", "16"),
    ("max_tokens", 3.5),
    ("max_tokens", True),
    ("temperature", -1),
    ("temperature", "hot"),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("top_k", 2.0),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("presence_penalty", 2.5),
    ("presence_penalty", -3),
    ("frequency_penalty", 2.01),
    ("frequency_penalty", None),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("stop", [""]),
    ("stop", ["ok", 3]),
    ("stop", 42),
    ("stop_token_ids", [1, "2"]),
    ("stop_token_ids", 5),
    ("stop_token_ids", [-1]),
    ("min_tokens", -1),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", "5"),
    ("seed", "7"),
    ("ignore_eos", "yes"),
    ("skip_special_tokens", 1),
    ("include_stop_str_in_output", None),
])
def test_bad_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    assert SamplingParams(min_tokens=10, max_tokens=None).min_tokens == 10
    assert SamplingParams(min_tokens=5, max_tokens=5).min_tokens == 5


def test_boundary_values_are_accepted():
    p = SamplingParams(temperature=0, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                       logprobs=0, top_k=1, repetition_penalty=0.5)
    assert p.logprobs == 0 and p.presence_penalty == -2.0
    assert SamplingParams(logprobs=20).logprobs == 20
