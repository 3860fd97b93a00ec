"""Stop strings: the incremental matcher agrees with a naive reference, its work per piece of
text does not grow with the number or length of stop strings, and the engine's caps refuse
requests with too many or too long stop strings."""
from __future__ import annotations

import random

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidParameterError
from engine.sampling_params import RequestLimits, SamplingParams
from engine.stop_checker import StopMatcher


def naive_match(text: str, old_len: int, stops: list[str]) -> tuple[int, int] | None:
    """Earliest (start, index) among the matches ending after `old_len`."""
    best = None
    for index, s in enumerate(stops):
        start = text.find(s, max(0, old_len - len(s) + 1))
        if start != -1 and (best is None or (start, index) < best):
            best = (start, index)
    return best


def naive_held_back(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@pytest.mark.parametrize("seed", range(30))
def test_matches_naive_reference_on_random_text(seed):
    rng = random.Random(seed)
    alphabet = "abc" if seed % 2 else "ab c🎉"
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
             for _ in range(rng.randint(1, 6))]
    matcher = StopMatcher(stops)
    text = ""
    for _ in range(40):
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
        old_len = len(text)
        text += piece
        assert matcher.feed(piece) == naive_match(text, old_len, stops), (stops, text)
        assert matcher.held_back() == naive_held_back(text, stops), (stops, text)


def test_ties_go_to_the_earlier_stop_string_and_duplicates_are_fine():
    m = StopMatcher(["bcd", "abc", "abc", "ab"])
    assert m.feed("xabcd") == (1, 1)  # "abc" and "ab" start at 1: "abc" is listed first
    m = StopMatcher(["abcd", "bc"])
    assert m.feed("ab") is None and m.held_back() == 2
    assert m.feed("c") == (1, 1)  # "bc" ends here; "abcd" has not happened (yet)


def test_work_per_piece_is_bounded_by_the_piece_not_by_the_stop_strings():
    # Adversarial for naive matching: long stop strings that all almost match all the time.
    stops = ["a" * 255 + chr(ord("b") + i) for i in range(16)]
    matcher = StopMatcher(stops)
    text = "a" * 5000
    for i in range(0, len(text), 3):
        before = matcher.steps
        assert matcher.feed(text[i:i + 3]) is None
        assert matcher.held_back() == min(255, len(text[:i + 3]))
        assert matcher.steps - before <= 2 * 255 + 3  # a failure walk is paid for by earlier steps
    # amortized: at most two transitions per character fed, whatever the stop strings are
    assert matcher.steps <= 2 * len(text)


class CharTokenizer:
    """One token per character (ids are code points): lets the test count characters."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(map(chr, ids))


def test_detokenizer_feeds_each_character_to_the_matcher_once():
    stops = [f"{i:02d}" + "z" * 250 for i in range(16)]
    params = SamplingParams(stop=stops, max_tokens=None)
    detok = IncrementalDetokenizer(CharTokenizer(), [ord("x")], params)
    text = "".join(random.Random(0).choice("0123456789 z") for _ in range(2000))
    for ch in text:
        assert detok.add_token(ord(ch)) is None
        detok.stream_delta(finished=False)
    assert detok.output_text == text
    assert detok._stops._pos == len(text)  # every character searched exactly once
    assert detok._stops.steps <= 2 * len(text)


def test_stop_string_caps_are_enforced_by_verify():
    limits = RequestLimits(vocab_size=100, max_stop_strings=4, max_stop_chars=20)
    SamplingParams(stop=["a"] * 4).verify(limits)
    SamplingParams(stop=["x" * 10, "y" * 10]).verify(limits)
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(stop=["a"] * 5).verify(limits)
    assert info.value.param == "stop" and "at most 4" in str(info.value)
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(stop=["x" * 10, "y" * 11]).verify(limits)
    assert info.value.param == "stop" and "20 characters" in str(info.value)
    defaults = RequestLimits(vocab_size=100)
    with pytest.raises(InvalidParameterError, match="stop"):
        SamplingParams(stop=["s" * 1000] * 3000).verify(defaults)


def test_sequences_of_one_request_share_one_automaton():
    params = SamplingParams(stop=["ab", "cd"], n=3)
    first, second = params.stop_matcher(), params.stop_matcher()
    assert first.automaton is second.automaton and first is not second
    assert first.feed("xab") == (1, 0) and second.held_back() == 0  # states are separate
    assert params.clone().stop_matcher().automaton is first.automaton
    params.stop = ["zz"]  # a changed list gets a new automaton
    assert params.stop_matcher().stops == ("zz",)
    assert SamplingParams().stop_matcher() is None
    assert SamplingParams(**vars(params)).stop == ["zz"]
