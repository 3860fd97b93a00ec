"""SSE streaming: byte-exact framing, disconnects free KV blocks, 50 concurrent streaming
clients get their own outputs, and errors after the stream began go in-band. The shared-server
tests run twice: one process, and the model split over 2 tensor-parallel gloo ranks."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import httpx
import openai
import pytest

from tests.test_server_harness import start_tiny_server


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def server(request, tmp_path_factory):
    """The same server in one process and with its model split over 2 gloo ranks (issue 16:
    a tensor-parallel server passes the streaming tests)."""
    srv = start_tiny_server(tmp_path_factory.mktemp("tiny"), tensor_parallel_size=request.param)
    yield srv
    srv.stop()


def _events(raw: bytes) -> list[bytes]:
    """Splits an SSE body into events, checking every byte of the framing on the way."""
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""  # the body ends right after the last blank line
    for e in events[:-1]:
        assert e.startswith(b"data: ") and b"\n" not in e and b"\r" not in e
    return [e[len(b"data: "):] for e in events[:-1]]


def test_raw_sse_framing_chat(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "sse-1"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"] == "sse-1" and int(r.headers["x-conveyor-prompt-tokens"]) > 0
    payloads = _events(r.content)
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["id"] == "chatcmpl-sse-1" and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    # exactly one content delta per generated token here, and compact JSON on one line
    assert sum(1 for c in chunks[1:-1] if c["choices"][0]["delta"].get("content")) >= 1
    assert payloads[0] == json.dumps(chunks[0], separators=(",", ":"), ensure_ascii=False).encode()


def test_raw_sse_framing_completions_without_usage(server):
    body = {"prompt": "abc", "max_tokens": 3, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        r = c.post("/v1/completions", json=body)
    chunks = [json.loads(p) for p in _events(r.content)[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def _wait_idle(server, timeout=15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        running = server.metric("vllm:num_requests_running")
        waiting = server.metric("vllm:num_requests_waiting")
        usage = server.metric("vllm:kv_cache_usage_perc")
        if (running, waiting, usage) == (0, 0, 0) or time.monotonic() > deadline:
            return {"running": running, "waiting": waiting, "usage": usage}
        time.sleep(0.05)


def _aborted(server) -> float:
    return sum(v for k, v in server.metrics().items()
               if k.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in k)


def _http_499(server) -> float:
    return sum(v for k, v in server.metrics().items()
               if k.startswith("conveyor_http_requests_total{") and 'status="499"' in k)


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, caplog):
    caplog.set_level(logging.INFO, logger="conveyor")
    assert _wait_idle(server) == {"running": 0, "waiting": 0, "usage": 0}
    generated_before = server.metric("vllm:generation_tokens_total")
    aborted_before, gone_before = _aborted(server), _http_499(server)
    body = json.dumps({"prompt": "tell me a very long story", "max_tokens": 240, "stream": True,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"X-Request-Id: gone-1\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while received.count(b"data: ") < 3:  # a few tokens in: the request is running
        received += sock.recv(65536)
    assert server.metric("vllm:kv_cache_usage_perc") > 0
    sock.close()
    assert _wait_idle(server) == {"running": 0, "waiting": 0, "usage": 0}
    assert server.engine.num_in_flight == 0
    assert not server.engine.engine.has_unfinished_requests()
    assert server.metric("vllm:generation_tokens_total") - generated_before < 240
    # the disconnect is visible: counted as an abort, as HTTP 499, and logged with the request id
    deadline = time.monotonic() + 10
    while _http_499(server) == gone_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _aborted(server) == aborted_before + 1 and _http_499(server) == gone_before + 1
    assert any("gone-1" in r.getMessage() and "client disconnected, aborted" in r.getMessage()
               for r in caplog.records)


def test_fifty_concurrent_streaming_clients(server):
    prompts = [f"Client number {i} says" + " la" * (i % 7) for i in range(50)]
    lengths = [2 + i % 5 for i in range(50)]
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        prompt_tokens = [c.post("/tokenize", json={"prompt": p}).json()["count"] for p in prompts]
    # Reference for the first ten: each prompt alone, greedy.
    reference = [client.completions.create(model=model, prompt=p, max_tokens=n, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].text
                 for p, n in zip(prompts[:10], lengths[:10])]

    async def one(aclient, i):
        stream = await aclient.completions.create(
            model=model, prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=True, logprobs=0,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        return [c async for c in stream]

    async def main():
        http_client = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=60))
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                                     timeout=300, http_client=http_client)
        try:
            return await asyncio.gather(*[one(aclient, i) for i in range(50)])
        finally:
            await aclient.close()

    results = asyncio.run(main())
    matches = 0
    for i, chunks in enumerate(results):
        assert len({c.id for c in chunks}) == 1  # every chunk of this stream is this request's
        text_chunks = [c for c in chunks if c.choices]
        text = "".join(c.choices[0].text for c in text_chunks)
        tokens = [t for c in text_chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        assert len(tokens) == lengths[i] and "".join(tokens) == text
        assert chunks[-1].usage.completion_tokens == lengths[i]
        assert chunks[-1].usage.prompt_tokens == prompt_tokens[i]  # its own prompt, not another's
        assert text_chunks[-1].choices[0].finish_reason == "length"
        if i < len(reference):
            matches += text == reference[i]
    # Batched float math may flip a near-tie of a random model, so allow one mismatch.
    assert matches >= len(reference) - 1


def test_error_after_stream_began_is_in_band_and_health_fails(tmp_path):
    srv = start_tiny_server(tmp_path / "dying")
    try:
        body = json.dumps({"prompt": "go", "max_tokens": 200, "stream": True, "ignore_eos": True})
        with httpx.Client(base_url=srv.base_url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", content=body,
                          headers={"content-type": "application/json"}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                first = next(line for line in lines if line)
                assert first.startswith("data: {")
                srv.engine.shutdown()  # the engine goes away mid-stream
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            error = json.loads(rest[-2][len("data: "):])
            assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
            assert "Traceback" not in error["error"]["message"]
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "failed"
            assert c.get("/ready").status_code == 503
    finally:
        srv.stop()
