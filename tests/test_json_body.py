"""server.json_body: every malformed body is a 400 with a clear reason, checked without
recursion and without echoing the offending string."""
from __future__ import annotations

import json
import random

import pytest

from server.errors import APIError
from server.json_body import MAX_DEPTH, _depth_exceeds, parse_json_body


def depth(v) -> int:
    if isinstance(v, list):
        return 1 + max((depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((depth(x) for x in v.values()), default=0)
    return 0


def test_depth_check_agrees_with_the_parsed_value():
    rng = random.Random(1)

    def gen(d):
        if d == 0 or rng.random() < 0.2:
            return rng.choice([1, "a[", "}{", None, '\\"[', "[[[["])
        if rng.random() < 0.5:
            return [gen(d - 1) for _ in range(rng.randint(0, 3))]
        return {f"k{i}]": gen(d - 1) for i in range(rng.randint(0, 3))}

    for _ in range(1500):
        v = gen(rng.randint(0, 12))
        raw = json.dumps(v).encode()
        for limit in (3, 5, 8):
            assert _depth_exceeds(raw, limit) == (depth(v) > limit), (raw, limit)


def reason(raw: bytes) -> APIError:
    with pytest.raises(APIError) as info:
        parse_json_body(raw)
    assert info.value.status == 400
    return info.value


def test_deep_nesting_and_long_numbers_are_400():
    assert "nested" in reason(b"[" * 100_000).message
    assert "nested" in reason(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)).message
    assert parse_json_body(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    assert parse_json_body(b'{"s": "' + b"[" * 1000 + b'"}')["s"] == "[" * 1000  # in a string
    assert "4300 digits" in reason(b'{"n": ' + b"7" * 5000 + b"}").message
    assert "not UTF-8" in reason(b'{"s": "\xff"}').message
    assert reason(b'{"a": 1,').code == "invalid_json"


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "a\\ud800b"}', "prompt"),
    (b'{"messages": [{"role": "user", "content": "x\\udfff"}]}', "messages[0].content"),
    (b'{"metadata": {"feature": ["ok", "\\udc00"]}}', "metadata.feature[1]"),
    (b'"\\ud800"', None),
])
def test_lone_surrogates_are_named_by_path_and_not_echoed(raw, param):
    err = reason(raw)
    assert err.param == param and err.code == "invalid_unicode"
    err.message.encode("utf-8")  # always encodable


def test_surrogate_pairs_are_ordinary_text():
    assert parse_json_body(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001F600"}
