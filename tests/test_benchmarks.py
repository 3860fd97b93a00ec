"""Smoke tests of the benchmark helpers: workload generation, arrival processes, the SSE client
against a fake OpenAI-style server, result aggregation and plotting on fake timings.
No timing assertions: the numbers checked here are computed from made-up records."""
from __future__ import annotations

import json
import math
import socket
import threading
import time

import pytest

from benchmarks import plots
from benchmarks.peers.openai_http import chat_request, completion_request, run_http
from benchmarks.stats import (RequestRecord, RunResult, goodput, markdown_table, median_summary, percentile,
                              ratio_table, summarize_run)
from benchmarks.workloads import (Workload, arrival_offsets, corpus_prompts, fixed_workload, mixed_workload,
                                  parse_fortunes)


def test_fixed_workload_is_deterministic_and_exact():
    a, b = fixed_workload(5, 7, 3, seed=1), fixed_workload(5, 7, 3, seed=1)
    assert a.requests == b.requests
    assert fixed_workload(5, 7, 3, seed=2).requests != a.requests
    assert all(len(r.prompt_ids) == 7 and r.output_len == 3 for r in a.requests)
    assert a.prompt_tokens == 35 and a.output_tokens == 15 and a.max_seq_len == 10
    assert len({r.prompt_ids for r in a.requests}) == 5  # random, not repeated


def test_mixed_workload_spans_its_ranges_and_round_trips_json():
    w = mixed_workload(200, (16, 1024), (16, 512), seed=3)
    plens = [len(r.prompt_ids) for r in w.requests]
    olens = [r.output_len for r in w.requests]
    assert 16 <= min(plens) < 100 and 900 < max(plens) <= 1024
    assert 16 <= min(olens) < 60 and 450 < max(olens) <= 512
    back = Workload.from_json(w.to_json())
    assert back.requests == w.requests and back.name == w.name and back.spec == w.spec


@pytest.mark.parametrize("call, field", [
    (lambda: fixed_workload(0, 4, 4), "num_requests"),
    (lambda: fixed_workload(2, 0, 4), "prompt_len"),
    (lambda: fixed_workload(2, 4, 0), "output_len"),
    (lambda: mixed_workload(2, (10, 5), (1, 2)), "prompt_range"),
    (lambda: mixed_workload(2, (1, 5), (0, 2)), "output_range"),
    (lambda: arrival_offsets(3, 0.0), "rate"),
    (lambda: arrival_offsets(3, 1.0, burstiness=0), "burstiness"),
    (lambda: corpus_prompts(["a"], ["b"], 2, long_fraction=1.5), "long_fraction"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_arrivals_poisson_mean_gap_and_infinite_rate():
    assert arrival_offsets(4, float("inf")) == [0.0] * 4
    offs = arrival_offsets(4000, 2.0, seed=5)
    assert offs[0] == 0.0 and all(b >= a for a, b in zip(offs, offs[1:]))
    gaps = [b - a for a, b in zip(offs, offs[1:])]
    assert abs(sum(gaps) / len(gaps) - 0.5) < 0.05
    # burstier gamma arrivals keep the mean but spread the gaps more
    bursty = arrival_offsets(4000, 2.0, burstiness=0.25, seed=5)
    bgaps = [b - a for a, b in zip(bursty, bursty[1:])]
    assert abs(sum(bgaps) / len(bgaps) - 0.5) < 0.1
    var = lambda xs: sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs)  # noqa: E731
    assert var(bgaps) > 2 * var(gaps)


def test_fortunes_and_corpus_prompts():
    text = "A bird in the hand.\n%\nSecond\nfortune\n%\n\n%\nThird.\n"
    assert parse_fortunes(text) == ["A bird in the hand.", "Second\nfortune", "Third."]
    shorts, longs = ["short one", "short two"], ["long passage " * 50]
    ps = corpus_prompts(shorts, longs, 50, long_fraction=0.5, output_range=(8, 16), seed=0)
    assert len(ps) == 50 and all(8 <= p.max_tokens <= 16 for p in ps)
    n_long = sum("long passage" in p.text for p in ps)
    assert 10 < n_long < 40
    assert all("long passage" not in p.text for p in corpus_prompts(shorts, [], 10, long_fraction=0.0))


def _fake_run() -> RunResult:
    recs = [RequestRecord(10, 5, 0.5, 2.5, [0.5, 0.5, 0.5, 0.5]),
            RequestRecord(20, 9, 1.5, 5.5, [0.5] * 8),
            RequestRecord(30, 0, None, 1.0, error="HTTP 500")]
    return RunResult("sys", "wl", wall_s=7.0, records=recs, peak_mem_bytes=512 * 2**20)


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0 and percentile(xs, 50) == 3.0
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q"):
        percentile(xs, 101)


def test_summarize_run_on_fake_timings():
    s = summarize_run(_fake_run())
    assert s["requests"] == 3 and s["errors"] == 1
    assert s["output_tokens"] == 14
    assert s["output_tok_s"] == pytest.approx(14 / 7)
    assert s["total_tok_s"] == pytest.approx((14 + 30) / 7)
    assert s["ttft_mean"] == pytest.approx(1.0) and s["ttft_p99"] == pytest.approx(0.5 + 0.99)
    assert s["tpot_mean"] == pytest.approx(0.5)  # (2.5-0.5)/4 and (5.5-1.5)/8
    assert s["itl_mean"] == pytest.approx(0.5)
    assert s["e2e_mean"] == pytest.approx(4.0)
    assert s["peak_mem_mb"] == pytest.approx(512)
    back = RunResult.from_dict(json.loads(json.dumps(_fake_run().to_dict())))
    assert summarize_run(back) == s


def test_goodput_counts_requests_within_both_slos():
    recs = _fake_run().records
    assert goodput(recs, 7.0, ttft_slo=1.0, tpot_slo=1.0) == pytest.approx(1 / 7)
    assert goodput(recs, 7.0, ttft_slo=2.0, tpot_slo=1.0) == pytest.approx(2 / 7)
    assert goodput(recs, 7.0, ttft_slo=2.0, tpot_slo=0.1) == 0.0


def test_median_ratios_and_table():
    runs = [{"system": "a", "skipped": None, "output_tok_s": x, "peak_mem_mb": 100.0} for x in (10.0, 30.0, 20.0)]
    m = median_summary(runs)
    assert m["output_tok_s"] == 20.0 and m["rounds"] == 3
    summaries = [m, {"system": "b", "skipped": None, "output_tok_s": 40.0, "peak_mem_mb": 50.0},
                 {"system": "c", "skipped": "not installed"}]
    assert ratio_table(summaries, "a") == {"b": 0.5}
    table = markdown_table(summaries, [("out tok/s", "output_tok_s", 1), ("mem", "peak_mem_mb", 0)])
    assert "| a | 20.0 | 100 |" in table and "skipped: not installed" in table


def test_plots_write_pngs(tmp_path):
    s = summarize_run(_fake_run())
    report = {"dtype": "bfloat16", "threads": 2, "workloads": {
        "w1": {"systems": [s, {**s, "system": "other", "output_tok_s": 3.0}, {"system": "x", "skipped": "no"}]}}}
    plots.throughput_bars(report, str(tmp_path / "t.png"))
    rows = [{**s, "request_rate": r, "goodput_req_s": 0.1} for r in (0.5, 1.0)]
    plots.serving_curves({"server": "fake", "arrival": "poisson", "rates": rows}, str(tmp_path / "s.png"))
    for name in ("t.png", "s.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _fake_openai_server():
    """A Starlette app streaming SSE like an OpenAI server: one chunk per token, then usage."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        body = await request.json()
        if body.get("max_tokens", 0) > 100:
            return JSONResponse({"error": {"message": "max_tokens too large"}}, status_code=400)
        n = body["max_tokens"]
        chat = "messages" in body

        async def gen():
            for i in range(n):
                choice = {"index": 0, "delta": {"content": f"t{i}"}} if chat else {"index": 0, "text": f"t{i}"}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': {'prompt_tokens': 7, 'completion_tokens': n}})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", completions, methods=["POST"])])


@pytest.fixture
def fake_server():
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_fake_openai_server(), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_http_client_counts_tokens_and_errors(fake_server):
    reqs = [completion_request("m", [1, 2, 3], 5), chat_request("m", "hi", 4, ignore_eos=True),
            chat_request("m", "too long", 200)]
    records, wall = run_http(fake_server, reqs, offsets=[0.0, 0.05, 0.1], max_concurrency=2)
    a, b, c = records
    assert (a.prompt_len, a.output_len, a.error) == (3, 5, None) and len(a.itls) == 4
    assert (b.prompt_len, b.output_len, b.error) == (7, 4, None) and len(b.itls) == 3
    assert a.ttft is not None and 0 <= a.ttft <= a.e2e <= wall
    assert c.error is not None and "400" in c.error and c.output_len == 0
    with pytest.raises(ValueError, match="offsets"):
        run_http(fake_server, reqs, offsets=[0.0])
