"""The server's life around its requests, on echo engines (fast, no model): liveness and
readiness, optional models that failed to load, the bounded drain at shutdown (triggered in
process, as SIGTERM would), and a shared store that goes down under running requests."""
from __future__ import annotations

import json
import logging
import time

import httpx
import pytest

from server.auth import hash_key
from server.config_file import ProductionConfig, config_from_dict
from server.settings import ServerSettings
from tests.test_prod_harness import FlakyStore, ProdServer, echo_engine


def events(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def first_event(lines) -> str:
    return next(line for line in lines if line.startswith("data: "))[len("data: "):]


def test_drain_refuses_new_requests_and_ends_streams_at_the_deadline():
    engine = echo_engine(step_delay=0.02)
    srv = ProdServer(engine, ProductionConfig(), settings=ServerSettings(shutdown_timeout=0.6)).start()
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            body = {"prompt": "a long story", "max_tokens": 400, "ignore_eos": True, "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert json.loads(first_event(lines))["choices"]
                began = time.monotonic()
                srv.app.state.drain.begin()  # what SIGTERM does
                deadline = time.monotonic() + 5
                while c.get("/ready").status_code != 503:
                    assert time.monotonic() < deadline
                refused = c.post("/v1/completions", json={"prompt": "new", "max_tokens": 2})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "server_shutting_down"
                assert "shutting down" in c.get("/ready").json()["reasons"]
                assert c.get("/health").status_code == 200  # alive: do not restart it, let it drain
                rest = events(lines)
            assert 0.5 < time.monotonic() - began < 5  # ended at the deadline, not at max_tokens
            assert rest[-1] == "[DONE]"
            error = json.loads(rest[-2])["error"]
            assert error["code"] == "server_shutting_down" and error["type"] == "service_unavailable_error"
        deadline = time.monotonic() + 5
        while engine.engine.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.engine.requests and engine.num_in_flight == 0  # aborted in the engine
    finally:
        srv.stop()


def test_health_reports_unavailable_optional_models_and_dead_engines(caplog):
    production = config_from_dict({"models": [{"name": "small"}, {"name": "big", "optional": True}]})
    engine = echo_engine("small")
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        srv = ProdServer(engine, production, unavailable_models={"big": "CUDA out of memory"}).start()
    try:
        assert any("big" in r.getMessage() and "CUDA out of memory" in r.getMessage() for r in caplog.records)
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            health = c.get("/health")
            assert health.status_code == 200
            assert health.json()["models"] == [{"name": "small", "state": "ready"},
                                               {"name": "big", "state": "unavailable", "reason": "CUDA out of memory"}]
            assert c.get("/ready").status_code == 200  # what is available is ready
            r = c.post("/v1/completions", json={"model": "big", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["small"]
            engine.shutdown()  # the engine thread ends: the process must be restarted
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "failed"
            assert c.get("/ready").status_code == 503
    finally:
        srv.stop()


KEYS = {"limited": "sk-limited-0123456789", "free": "sk-free-0123456789"}


def outage_config(fail_open: bool) -> ProductionConfig:
    return config_from_dict({
        "store": {"fail_open": fail_open}, "cache": {"response_cache": True},
        "tenants": [{"name": "limited", "api_key_sha256": [hash_key(KEYS["limited"])], "tokens_per_minute": 100000},
                    {"name": "free", "api_key_sha256": [hash_key(KEYS["free"])]}]})


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.mark.parametrize("fail_open", [False, True])
def test_store_outage_degrades_cleanly(fail_open):
    store = FlakyStore()
    srv = ProdServer(echo_engine(step_delay=0.01), outage_config(fail_open), store=store).start()
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            body = {"prompt": "one two three four five six", "max_tokens": 40, "ignore_eos": True, "stream": True}
            with c.stream("POST", "/v1/completions", json=body, headers=auth("limited")) as r:
                lines = r.iter_lines()
                first_event(lines)
                store.down = True  # the store dies under a running stream
                rest = events(lines)
            assert rest[-1] == "[DONE]" and all("error" not in json.loads(e) for e in rest[:-1])
            ready = c.get("/ready")
            if fail_open:  # it still serves, so it stays in the load balancer
                assert ready.status_code == 200
            else:
                assert ready.status_code == 503 and "the shared store is unreachable" in ready.json()["reasons"]
            assert srv.metric("conveyor_store_errors_total") >= 1
            limited = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=auth("limited"))
            if fail_open:
                assert limited.status_code == 200 and "x-ratelimit-limit-tokens" not in limited.headers
            else:
                assert limited.status_code == 503 and int(limited.headers["retry-after"]) >= 1
                assert limited.json()["error"]["code"] == "store_unavailable"
            free = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0},
                          headers=auth("free"))
            assert free.status_code == 200  # no limits: nothing to ask the store; the cache misses
            store.down = False
            assert c.get("/ready").status_code == 200
            again = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=auth("limited"))
            assert again.status_code == 200 and again.headers["x-ratelimit-limit-tokens"] == "100000"
    finally:
        srv.stop()


def test_json_request_disconnect_is_aborted_and_counted_as_499(caplog):
    import socket

    caplog.set_level(logging.INFO, logger="conveyor")
    engine = echo_engine(step_delay=0.02)
    srv = ProdServer(engine, ProductionConfig()).start()
    try:
        body = json.dumps({"prompt": "wait for me", "max_tokens": 400, "ignore_eos": True}).encode()
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-Request-Id: json-gone-1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while not engine.engine.requests:  # running in the engine
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sock.close()
        while srv.metric("conveyor_http_requests_total", status="499") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not engine.engine.requests  # aborted in the engine
        assert srv.metric("vllm:request_success_total", finished_reason="abort") == 1
        assert any("json-gone-1" in r.getMessage() and "client disconnected, aborted" in r.getMessage()
                   for r in caplog.records)
    finally:
        srv.stop()


def test_ready_only_once_every_model_has_loaded():
    import threading

    from engine.async_engine import AsyncEngine
    from tests.test_prod_harness import EchoEngine, smollm2_tokenizer

    tok, loaded = smollm2_tokenizer(), threading.Event()
    engine = AsyncEngine(engine_factory=lambda: loaded.wait(30) and EchoEngine(tok, "slow"))
    srv = ProdServer(engine, ProductionConfig())
    srv.thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            health = c.get("/health")  # alive while loading: no restart
            assert health.status_code == 200 and health.json()["models"][0]["state"] == "loading"
            ready = c.get("/ready")
            assert ready.status_code == 503 and ready.json()["reasons"] == ["model unknown is loading"]
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_ready"
            loaded.set()
            assert engine.wait_ready(30)
            assert c.get("/ready").status_code == 200
            assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        loaded.set()
        srv.stop()
