"""OpenTelemetry tracing and the per-request summary log line, through real HTTP: a tiny real
engine behind the production layer (keys, a rate-limited tenant, a PII guard), spans caught by
the SDK's in-memory exporter."""
from __future__ import annotations

import io
import json
import logging
import time

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from engine.async_engine import AsyncEngine
from server.app import build_app
from server.auth import hash_key
from server.config_file import load_config
from server.log_format import JsonFormatter
from server.request_trace import RequestTrace
from server.settings import ServerSettings
from server.tracing import build_tracing, traces_endpoint
from tests.test_server_harness import ServerThread, tiny_config

KEYS = {"acme": "sk-acme-trace-test", "rpm": "sk-rpm-trace-test"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SECRET = "zebra-secret-42"  # prompt text that must never reach a log line by default
CONFIG = f"""
rate_limit_window_seconds = 3600  # one window for the whole test
[guards.pii]
type = "pii"
[[tenants]]
name = "acme"
api_key_sha256 = ["{hash_key(KEYS['acme'])}"]
guards = ["pii"]
admin = true
[[tenants]]
name = "rpm"
api_key_sha256 = ["{hash_key(KEYS['rpm'])}"]
requests_per_minute = 1
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace")
    (path / "conveyor.toml").write_text(CONFIG)
    engine = AsyncEngine(tiny_config(str(path / "tiny")))
    exporter = InMemorySpanExporter()
    app = build_app(engine, ServerSettings(served_model_name="tiny"), production=load_config(path / "conveyor.toml"),
                    span_exporter=exporter)
    srv = ServerThread(engine, app=app).start()
    srv.exporter = exporter
    yield srv
    srv.stop()


@pytest.fixture()
def logs():
    """Every `conveyor.*` log line as (JSON text, plain text) while the test runs."""
    json_out, text_out = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(json_out), logging.StreamHandler(text_out)]
    handlers[0].setFormatter(JsonFormatter())
    handlers[1].setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("conveyor")
    old = log.level
    log.setLevel(logging.INFO)
    for h in handlers:
        log.addHandler(h)
    yield json_out, text_out
    for h in handlers:
        log.removeHandler(h)
    log.setLevel(old)


def root_span(exporter: InMemorySpanExporter, request_id: str, timeout: float = 10.0):
    """The finished root span of `request_id` and its children, waiting for it to end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = exporter.get_finished_spans()
        roots = [s for s in spans if s.kind == SpanKind.SERVER and s.attributes["conveyor.request_id"] == request_id]
        if roots:
            root = roots[0]
            return root, [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
        time.sleep(0.05)
    raise AssertionError(f"no finished span for {request_id}")


def summary_line(json_out: io.StringIO, request_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in json_out.getvalue().splitlines():
            obj = json.loads(line)
            if obj.get("event") == "request_summary" and obj.get("request_id") == request_id:
                return obj
        time.sleep(0.05)
    raise AssertionError(f"no summary line for {request_id}")


def test_streamed_request_span_continues_the_callers_trace_and_logs_one_summary(server, logs):
    json_out, text_out = logs
    headers = {"Authorization": f"Bearer {KEYS['acme']}", "X-Request-Id": "trace-stream-1",
               "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    body = {"model": "tiny", "prompt": f"Hello {SECRET}", "max_tokens": 8, "temperature": 0.5, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        r = http.post("/v1/completions", headers=headers, json=body)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    root, children = root_span(server.exporter, "trace-stream-1")
    assert format(root.context.trace_id, "032x") == TRACE_ID  # the caller's trace continues
    assert format(root.parent.span_id, "016x") == PARENT_ID and root.parent.is_remote
    a = root.attributes
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"] == "tiny"
    assert a["gen_ai.response.id"] == "cmpl-trace-stream-1"
    assert a["gen_ai.request.max_tokens"] == 8 and a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.usage.output_tokens"] == 8 and a["gen_ai.usage.input_tokens"] > 0
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("length",)
    assert a["conveyor.tenant"] == "acme" and a["conveyor.route"] == "explicit"
    assert a["conveyor.cached_tokens"] == 0 and a["conveyor.preemptions"] == 0
    assert root.status.status_code != StatusCode.ERROR
    names = [c.name for c in children]
    for phase in ("auth", "input_guards", "route", "rate_limit", "queue", "prefill", "decode", "settle"):
        assert phase in names, (phase, names)
    by_name = {c.name: c for c in children}
    assert by_name["queue"].end_time <= by_name["prefill"].start_time + 1000  # in order (ns)
    assert by_name["prefill"].end_time <= by_name["decode"].start_time + 1000
    chunks = [e for e in by_name["prefill"].events if e.name == "prefill_chunk"]
    assert chunks and sum(e.attributes["conveyor.chunk_tokens"] for e in chunks) == a["gen_ai.usage.input_tokens"]
    assert root.start_time <= by_name["queue"].start_time and by_name["settle"].end_time <= root.end_time
    assert any(e.name == "first_token" for e in root.events)
    summary = summary_line(json_out, "trace-stream-1")
    assert summary["status"] == 200 and summary["finish_reason"] == "length"
    assert summary["tenant"] == "acme" and summary["model"] == "tiny" and summary["level"] == "info"
    assert summary["completion_tokens"] == 8 and summary["prompt_tokens"] == a["gen_ai.usage.input_tokens"]
    assert summary["ttft_s"] > 0 and summary["total_s"] >= summary["ttft_s"]
    assert summary["preemptions"] == 0 and summary["client_disconnected"] is False
    assert {"timestamp", "logger", "message", "cached_tokens"} <= set(summary)
    text = text_out.getvalue()
    assert "[request_id=trace-stream-1] summary: status=200 finish_reason=length" in text
    for out in (json_out.getvalue(), text):  # nothing secret unless --log-prompts
        assert SECRET not in out and KEYS["acme"] not in out


@pytest.mark.parametrize("case", ["bad_field", "rate_limited"])
def test_rejected_request_span_has_error_status(server, logs, case):
    json_out, _ = logs
    rid = f"trace-reject-{case}"
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        if case == "bad_field":
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "temperature": -1},
                          headers={"Authorization": f"Bearer {KEYS['acme']}", "X-Request-Id": rid})
            want = 400
        else:
            for i in range(2):  # one request per minute: the second is refused
                r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                              headers={"Authorization": f"Bearer {KEYS['rpm']}", "X-Request-Id": f"{rid}-{i}"})
            rid, want = f"{rid}-1", 429
    assert r.status_code == want
    root, children = root_span(server.exporter, rid)
    assert root.status.status_code == StatusCode.ERROR
    assert root.attributes["http.response.status_code"] == want
    assert root.attributes["error.type"] == r.json()["error"]["code"]
    if case == "rate_limited":
        limit = next(c for c in children if c.name == "rate_limit")
        assert limit.status.status_code == StatusCode.ERROR  # the phase that refused it
    summary = summary_line(json_out, rid)
    assert summary["status"] == want and summary["error"] == r.json()["error"]["code"]


def test_aborted_stream_span_and_summary_say_the_client_left(server, logs):
    json_out, _ = logs
    body = {"model": "tiny", "prompt": "Count", "max_tokens": 240, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEYS['acme']}", "X-Request-Id": "trace-abort-1"}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first event, then leave
    root, _ = root_span(server.exporter, "trace-abort-1")
    assert root.status.status_code == StatusCode.ERROR
    assert root.attributes["conveyor.client_disconnected"] is True
    assert root.attributes["http.response.status_code"] == 499
    assert tuple(root.attributes["gen_ai.response.finish_reasons"]) == ("abort",)
    assert root.attributes["gen_ai.usage.output_tokens"] < 240
    summary = summary_line(json_out, "trace-abort-1")
    assert summary["client_disconnected"] is True and summary["status"] == 499


def test_tracing_off_creates_no_spans(monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    assert build_tracing(None) is None
    trace = RequestTrace.begin(None, "r", chat=True, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert trace.span is None and trace.phase("auth") is trace.phase("route")  # one shared no-op


def test_traces_endpoint_from_flag_and_standard_variables(monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    assert traces_endpoint(None) is None
    assert traces_endpoint("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_endpoint("http://collector:4318/v1/traces") == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318/")
    assert traces_endpoint(None) == "http://otel:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://otel:4318/custom")
    assert traces_endpoint(None) == "http://otel:4318/custom"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert traces_endpoint("http://collector:4318") is None


def test_log_prompts_puts_the_text_in_the_summary_only_when_asked():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("conveyor.request")
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        for flag in (False, True):
            trace = RequestTrace.begin(None, f"p-{flag}", chat=False, headers={}, log_prompts=flag)
            trace.prompt = SECRET if flag else None
            trace.end()
            trace.end()  # once only
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["p-False", "p-True"]
    assert "prompt" not in lines[0] and lines[1]["prompt"] == SECRET


def test_cli_flags_and_json_log_setup():
    from conveyor.cli import build_parser
    from server.log_format import use_json_logs

    args = build_parser().parse_args(["serve", "--log-format", "json", "--log-prompts",
                                      "--otlp-traces-endpoint", "http://collector:4318"])
    assert (args.log_format, args.log_prompts, args.otlp_traces_endpoint) == ("json", True, "http://collector:4318")
    assert build_parser().parse_args(["serve"]).log_format == "text"
    log = logging.getLogger("conveyor.test-json")
    out = io.StringIO()
    log.addHandler(logging.StreamHandler(out))
    log.propagate = False
    log.setLevel(logging.INFO)
    use_json_logs(log)
    log.warning("[request_id=r-9] hello %s", "there", extra={"request_id": "r-9", "tenant": "t"})
    line = json.loads(out.getvalue())
    assert line["message"] == "hello there" and line["request_id"] == "r-9" and line["tenant"] == "t"
    assert line["level"] == "warning" and line["logger"] == "conveyor.test-json" and line["timestamp"].endswith("Z")
    log.info("[request_id=r-10] POST /v1/completions -> 200 in 0.1s")  # the access line: no `extra`
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["request_id"] == "r-10" and line["message"] == "POST /v1/completions -> 200 in 0.1s"
