"""Every error case with its status and OpenAI envelope; messages carry no internals."""
from __future__ import annotations

import time

import httpx
import pytest

from server.limits import Admission
from server.settings import ServerSettings
from tests.test_server_harness import TINY_MAX_MODEL_LEN, start_tiny_server

SETTINGS = ServerSettings(max_tokens_cap=64, max_prompt_tokens=200, max_waiting_requests=4,
                          max_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_tiny_server(tmp_path_factory.mktemp("tiny"), SETTINGS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    msg = err["message"]
    for leak in ("Traceback", "File \"", ".py", "Error:", "/work", "site-packages"):
        assert leak not in msg, msg
    assert r.headers["x-request-id"]
    return err


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": [1, 2]}, "stop"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"prompt": 12}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "min_tokens": 10, "max_tokens": 5}, "min_tokens"),
])
def test_wrong_types_and_ranges_name_the_field(http, body, param):
    err = error_of(http.post("/v1/completions", json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split(".")[-1] in err["message"]


def test_chat_message_validation_names_the_field(http):
    err = error_of(http.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]}), 400)
    assert err["param"] == "messages[0].role"
    err = error_of(http.post("/v1/chat/completions", json={"messages": []}), 400)
    assert err["param"] == "messages"
    err = error_of(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400)
    assert err["param"] == "messages[0].content[0]"


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "some_future_field": {"a": 1}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_malformed_json_and_non_object_body(http):
    err = error_of(http.post("/v1/completions", content=b'{"prompt": "x",',
                             headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in err["message"]
    err = error_of(http.post("/v1/completions", json=[1, 2]), 400)
    assert "JSON object" in err["message"]


def test_body_too_large(http):
    err = error_of(http.post("/v1/completions", json={"prompt": "x" * (SETTINGS.max_body_bytes + 10)}), 413)
    assert str(SETTINGS.max_body_bytes) in err["message"]


def test_unknown_model_route_and_method(http):
    err = error_of(http.post("/v1/completions", json={"prompt": "x", "model": "gpt-17"}), 404)
    assert err["param"] == "model" and err["code"] == "model_not_found" and "gpt-17" in err["message"]
    error_of(http.get("/v1/nothing-here"), 404)
    r = http.get("/v1/completions")
    err = error_of(r, 405)
    assert "POST" in r.headers["allow"]


def test_context_length_exceeded_message(http):
    prompt = "hello " * 199  # under the 200-token prompt cap, but with 60 more over the context
    n_prompt = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    assert n_prompt <= 200 and n_prompt + 60 > TINY_MAX_MODEL_LEN
    err = error_of(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 60, "model": None}), 400)
    assert f"maximum context length is {TINY_MAX_MODEL_LEN} tokens" in err["message"]
    assert f"{n_prompt + 60} tokens ({n_prompt} in your prompt, 60 in the completion)" in err["message"]
    err = error_of(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hello " * 168}], "max_tokens": 60}), 400)
    assert "in the messages" in err["message"] and err["code"] == "context_length_exceeded"


def test_server_caps(http):
    err = error_of(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 65}), 400)
    assert err["param"] == "max_tokens" and "64" in err["message"]
    long_ids = list(range(300, 300 + 201))
    err = error_of(http.post("/v1/completions", json={"prompt": long_ids, "max_tokens": 1}), 400)
    assert "200" in err["message"] and err["code"] == "prompt_too_long"
    # a missing max_tokens defaults to the rest of the context, capped at 64
    r = http.post("/v1/completions", json={"prompt": "Hi", "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64


def test_queue_full_answers_503_with_retry_after(http, server):
    admission: Admission = server.app.state.admission
    held = [admission.admit(1) for _ in range(SETTINGS.max_waiting_requests)]  # as if 4 were waiting
    try:
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        err = error_of(r, 503)
        assert r.headers["retry-after"] == "1" and err["code"] == "server_overloaded"
    finally:
        for ticket in held:
            ticket.release()
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert server.metric("conveyor_requests_rejected_total") >= 1


def test_admission_bounds_tokens_and_releases_once():
    adm = Admission(ServerSettings(max_waiting_requests=10, max_waiting_tokens=100))
    a = adm.admit(60)
    with pytest.raises(Exception) as info:
        adm.admit(50)
    assert info.value.status == 503 and info.value.retry_after == 1
    b = adm.admit(40)
    a.release()
    a.release()  # idempotent
    assert (adm.waiting_requests, adm.waiting_tokens) == (1, 40)
    b.release()
    # one request larger than the whole budget still runs when nothing waits
    adm.admit(500).release()
    assert (adm.waiting_requests, adm.waiting_tokens) == (0, 0)


def test_timeout_aborts_request(http, server):
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 64, "ignore_eos": True, "timeout": 0.001})
    err = error_of(r, 408)
    assert err["param"] == "timeout"
    assert server.engine.num_in_flight == 0
    deadline = time.monotonic() + 10
    while server.engine.get_stats().num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.engine.get_stats().num_running == 0


def test_unsupported_known_fields_are_rejected(http):
    err = error_of(http.post("/v1/completions", json={"prompt": "x", "echo": True}), 400)
    assert err["param"] == "echo"
    err = error_of(http.post("/v1/completions", json={"prompt": ["a", "b"]}), 400)
    assert err["param"] == "prompt" and "one prompt per request" in err["message"]


def still_serves(http) -> None:
    """The engine survived: a normal request still completes."""
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert http.get("/health").status_code == 200


def post_raw(http, path: str, raw: bytes) -> httpx.Response:
    return http.post(path, content=raw, headers={"content-type": "application/json"})


@pytest.mark.parametrize("body,param", [
    # an id equal to the vocabulary size used to raise IndexError on the engine thread
    ({"prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [49152]}, "stop_token_ids"),
    ({"prompt": "hi", "max_tokens": 4, "stop_token_ids": [10 ** 12]}, "stop_token_ids"),
    ({"prompt": [49152], "max_tokens": 4}, "prompt"),
    ({"prompt": [10 ** 30], "max_tokens": 4}, "prompt"),
    ({"prompt": "hi", "max_tokens": 4, "seed": 2 ** 70}, "seed"),
    ({"prompt": "hi", "max_tokens": 4, "seed": -(2 ** 63) - 1}, "seed"),
    ({"prompt": "hi", "max_tokens": 4, "priority": 10 ** 30}, "priority"),
    ({"prompt": "hi", "max_tokens": 4, "top_k": 10 ** 30}, "top_k"),
    ({"prompt": "hi", "max_tokens": 4, "stop": ["x" * 10] * 17}, "stop"),
    ({"prompt": "hi", "max_tokens": 4, "stop": ["y" * 1000] * 5}, "stop"),
])
def test_values_checked_against_the_model_before_queueing(http, body, param):
    err = error_of(http.post("/v1/completions", json=body), 400)
    assert err["param"] == param and isinstance(err["code"], str)
    still_serves(http)


def test_in_range_seeds_are_accepted(http):
    for seed in (2 ** 63 - 1, -(2 ** 63)):
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "seed": seed, "n": 2})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw,param,words", [
    (b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", None, "4300 digits"),
    (b"[" * 60_000, None, "nested"),  # under this module's 64 KiB body limit
    (b'{"prompt": "x", "metadata": ' + b"[" * 70 + b"]" * 70 + b"}", None, "nested"),
    (b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt", "surrogate"),
    (b'{"prompt": "x", "model": "a\\ud800b"}', "model", "surrogate"),
    (b'{"prompt": "x", "temperature": 1e400}', "temperature", "finite"),
    (b'{"prompt": "x", "timeout": 1e400}', "timeout", "finite"),
    (b'{"prompt": "x", "repetition_penalty": 1e400}', "repetition_penalty", "finite"),
])
def test_hostile_bodies_get_a_clear_400(http, raw, param, words):
    err = error_of(post_raw(http, "/v1/completions", raw), 400)
    assert err["param"] == param and words in err["message"]
    assert "\\ud800" not in err["message"].lower() or "escape" in err["message"]  # never echoed
    still_serves(http)


def test_lone_surrogates_in_chat_and_tokenize_name_the_field(http):
    err = error_of(post_raw(http, "/v1/chat/completions",
                            b'{"messages": [{"role": "user", "content": "a\\udc00"}], "max_tokens": 2}'), 400)
    assert err["param"] == "messages[0].content"
    err = error_of(post_raw(http, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": '
                            b'[{"type": "text", "text": "\\ud800"}]}]}'), 400)
    assert err["param"] == "messages[0].content[0].text"
    err = error_of(post_raw(http, "/tokenize", b'{"prompt": "a\\udc00"}'), 400)
    assert err["param"] == "prompt"
    # a proper surrogate pair is an ordinary character
    r = post_raw(http, "/tokenize", b'{"prompt": "\\ud83d\\ude00"}')
    assert r.status_code == 200 and r.json()["count"] >= 1


def test_oversized_max_tokens_is_blamed_on_max_tokens():
    from server.errors import APIError
    from server.limits import resolve_max_tokens

    with pytest.raises(APIError) as info:
        resolve_max_tokens(3, 10 ** 6, TINY_MAX_MODEL_LEN, ServerSettings(max_tokens_cap=None), chat=False)
    assert info.value.param == "max_tokens"
    with pytest.raises(APIError) as info:  # the prompt is what does not fit
        resolve_max_tokens(TINY_MAX_MODEL_LEN, 10, TINY_MAX_MODEL_LEN, ServerSettings(max_tokens_cap=None), chat=True)
    assert info.value.param == "messages"


def test_error_code_is_always_a_string(http):
    for r in (http.get("/v1/nothing-here"), http.get("/v1/completions"),
              http.post("/v1/completions", json={"prompt": "x", "n": 0}),
              http.post("/detokenize", json={"tokens": [10 ** 30]})):
        assert r.status_code >= 400 and isinstance(r.json()["error"]["code"], str), r.text
    from server.errors import APIError
    for status in (400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 503, 418):
        assert isinstance(APIError(status, "x").body()["error"]["code"], str)


def test_usage_query_times_must_be_finite(http):
    for value in ("1e400", "nan", "-inf"):
        err = error_of(http.get(f"/v1/usage?start={value}"), 400)
        assert err["param"] == "start"
    err = error_of(http.get("/v1/usage?end=inf"), 400)
    assert err["param"] == "end"


def test_integral_floats_count_as_integers_as_in_json_schema(http):
    r = http.post("/v1/completions", json={"prompt": [1.0, 504.0], "max_tokens": 2.0, "seed": 7.0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text
    err = error_of(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2.5}), 400)
    assert err["param"] == "max_tokens"
    err = error_of(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4, "max_tokens": 0}), 400)
    assert err["param"] == "max_tokens"  # validated even when max_completion_tokens wins


def test_logit_bias_and_allowed_token_ids(http):
    import re

    piece = {t: http.post("/detokenize", json={"tokens": [t]}).json()["prompt"] for t in (1000, 1001)}
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True,
                                           "logit_bias": {"1000": 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == piece[1000] * 3  # a +100 bias always wins
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True,
                                           "allowed_token_ids": [1000, 1001], "temperature": 1.0})
    assert r.status_code == 200, r.text
    either = "|".join(re.escape(p) for p in piece.values())
    assert re.fullmatch(f"(?:{either}){{4}}", r.json()["choices"][0]["text"])
    for body, param in (({"logit_bias": {"49152": 1}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                        ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
                        ({"allowed_token_ids": []}, "allowed_token_ids"),
                        ({"allowed_token_ids": [5, 10 ** 12]}, "allowed_token_ids")):
        err = error_of(http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **body}), 400)
        assert err["param"] == param, err
    still_serves(http)
