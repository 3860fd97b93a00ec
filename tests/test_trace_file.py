"""`conveyor serve --trace-file`: one JSON line per finished request, never text; the simulator
loads it and `benchmarks/replay.py` replays it against the server (loopback only)."""
from __future__ import annotations

import json

import httpx
import pytest

from benchmarks import replay
from engine.async_engine import AsyncEngine
from engine.scheduler.traces import load_trace
from server.settings import ServerSettings
from server.trace_file import TRACE_FIELDS
from tests.test_server_harness import ServerThread, tiny_config


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tracefile")
    engine = AsyncEngine(tiny_config(str(path / "tiny")))
    srv = ServerThread(engine, ServerSettings(served_model_name="tiny", trace_file=str(path / "trace.jsonl"))).start()
    srv.trace_path = path / "trace.jsonl"
    yield srv
    srv.stop()


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_each_finished_request_appends_one_line_without_text(server):
    before = len(lines(server.trace_path))
    secret = "the secret prompt text"
    r1 = httpx.post(server.base_url + "/v1/completions", timeout=60,
                    json={"model": "tiny", "prompt": secret, "max_tokens": 5, "ignore_eos": True, "priority": 3})
    r2 = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": secret}], "max_tokens": 4, "ignore_eos": True})
    bad = httpx.post(server.base_url + "/v1/completions", timeout=60, json={"model": "tiny", "prompt": "x", "max_tokens": -1})
    assert r1.status_code == r2.status_code == 200 and bad.status_code == 400
    rows = lines(server.trace_path)[before:]
    assert len(rows) == 3
    assert secret not in server.trace_path.read_text()
    assert all(set(row) == set(TRACE_FIELDS) for row in rows)
    done = [row for row in rows if row["status"] == 200]
    assert [row["output_len"] for row in done] == [5, 4]
    assert done[0]["prompt_len"] == r1.json()["usage"]["prompt_tokens"] and done[0]["priority"] == 3
    assert done[1]["priority"] == 0 and done[1]["model"] == "tiny"
    for row in done:
        assert row["finish_reason"] == "length" and row["ttft_s"] > 0
        assert row["arrival_time"] <= row["arrival_time"] + row["ttft_s"] <= row["finished_time"]
    assert [row["status"] for row in rows if row["status"] != 200] == [400]

    trace = load_trace(server.trace_path)  # the refused request is skipped
    assert [(t.prompt_len, t.output_len, t.priority) for t in trace[-2:]] == \
        [(done[0]["prompt_len"], 5, 3), (done[1]["prompt_len"], 4, 0)]
    assert trace[0].arrival_time == 0


def test_replay_sends_the_trace_back_and_is_loopback_only(server, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"arrival_time": 0.05 * i, "prompt_len": 6 + i, "output_len": 3,
                                          "priority": i % 2}) + "\n" for i in range(4)))
    before = len(lines(server.trace_path))
    summary = replay.main([str(trace), "--url", server.base_url, "--speed", "2", "--max-requests", "3",
                           "--max-seconds", "30", "--vocab-size", "100", "--out", str(tmp_path / "r.jsonl")])
    assert summary["num_sent"] == summary["num_ok"] == 3
    assert summary["ttft_s"]["p50"] > 0
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["output_len"] for r in records] == [3, 3, 3]
    served = lines(server.trace_path)[before:]  # the server recorded what was replayed
    assert sorted((r["prompt_len"], r["output_len"], r["priority"]) for r in served) == [(6, 3, 0), (7, 3, 1), (8, 3, 0)]
    with pytest.raises(ValueError, match="loopback"):
        replay.check_loopback("http://192.0.2.1:8000")
