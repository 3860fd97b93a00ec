"""The Grafana dashboard (deploy/grafana/conveyor-dashboard.json) names only metrics the server
exports: a server with tenants, a guard and a rate limit gets a few requests, /metrics and
/admin/metrics are scraped, and every metric in every panel's PromQL must be among the scraped
sample names (which carry the _bucket/_sum/_count/_total suffixes). Also: the panels evaluate
with benchmarks/promql_lite.py (what draws docs/img/dashboard.png), and the new /metrics
figures (process, step phases) are there."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.promql_lite import Scrapes, evaluate
from engine.async_engine import AsyncEngine
from server.app import build_app
from server.auth import hash_key
from server.config_file import load_config
from server.settings import ServerSettings
from tests.test_server_harness import ServerThread, tiny_config

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "conveyor-dashboard.json"
KEYS = {"acme": "sk-acme-dash-test", "rpm": "sk-rpm-dash-test", "ops": "sk-ops-dash-test"}
CONFIG = f"""
rate_limit_window_seconds = 3600
[guards.pii]
type = "pii"
redact_input = true
[[tenants]]
name = "acme"
api_key_sha256 = ["{hash_key(KEYS['acme'])}"]
guards = ["pii"]
[[tenants]]
name = "rpm"
api_key_sha256 = ["{hash_key(KEYS['rpm'])}"]
requests_per_minute = 1
[[tenants]]
name = "ops"
api_key_sha256 = ["{hash_key(KEYS['ops'])}"]
admin = true
"""
_METRIC = re.compile(r"(?<![\w:$\"])((?:vllm:|conveyor_|process_)[a-zA-Z0-9_:]*)")
# Series that exist only on a GPU machine (NVML); checked against their collector's source instead.
GPU_ONLY = ("conveyor_gpu_utilization_percent", "conveyor_gpu_device_memory_used_bytes",
            "conveyor_gpu_device_memory_total_bytes")


def expressions() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> tuple[str, set[str]]:
    """(the text of two scrapes a second apart, after some traffic; every sample name)"""
    path = tmp_path_factory.mktemp("dash")
    (path / "conveyor.toml").write_text(CONFIG)
    engine = AsyncEngine(tiny_config(str(path / "tiny")))
    app = build_app(engine, ServerSettings(served_model_name="tiny"), production=load_config(path / "conveyor.toml"))
    srv = ServerThread(engine, app=app).start()
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            acme = {"Authorization": f"Bearer {KEYS['acme']}"}
            for stream in (False, True):
                r = http.post("/v1/completions", headers=acme, json={
                    "model": "tiny", "prompt": "mail me at bob@example.com", "max_tokens": 4, "stream": stream})
                assert r.status_code == 200, r.text
            assert http.post("/v1/completions", headers=acme, json={"prompt": "x", "temperature": -1}).status_code == 400
            rpm = {"Authorization": f"Bearer {KEYS['rpm']}"}
            codes = [http.post("/v1/completions", headers=rpm, json={"prompt": "hi", "max_tokens": 2}).status_code
                     for _ in range(2)]
            assert codes == [200, 429], codes
            texts = []
            for _ in range(2):
                texts.append(http.get("/metrics").text +
                             http.get("/admin/metrics", headers={"Authorization": f"Bearer {KEYS['ops']}"}).text)
                time.sleep(1.0)
        names = {s.name for f in text_string_to_metric_families(texts[-1]) for s in f.samples}
        return texts, names
    finally:
        srv.stop()


def test_every_dashboard_metric_is_exported(scraped):
    _, names = scraped
    used = {m for e in expressions() for m in _METRIC.findall(e)}
    assert len(used) >= 20, used
    gpu_source = (ROOT / "server" / "gpu_metrics.py").read_text()
    missing = sorted(m for m in used if m not in names and not (m in GPU_ONLY and f'"{m}"' in gpu_source))
    assert not missing, f"dashboard metrics the server does not export: {missing}"


def test_dashboard_is_per_model_and_covers_the_issue(scraped):
    dash = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "model_name"]
    text = json.dumps(dash)
    for metric in ("vllm:request_success_total", "vllm:time_to_first_token_seconds_bucket",
                   "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                   "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total",
                   "vllm:num_preemptions_total", "conveyor_tenant_tokens_total", "conveyor_tenant_cost_dollars_total",
                   "conveyor_rate_limited_total", "conveyor_guard_actions_total", "conveyor_step_phase_seconds_sum"):
        assert metric in text, metric
    for panel in dash["panels"]:  # every per-model series is filtered by the model variable
        for t in panel.get("targets", []):
            if "vllm:" in t["expr"]:
                assert 'model_name=~"$model_name"' in t["expr"], t["expr"]


def test_panels_evaluate_over_the_scrapes(scraped):
    texts, names = scraped
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names
    assert "conveyor_step_phase_seconds_count" in names
    scrapes = Scrapes([], [])
    for i, text in enumerate(texts):
        scrapes.add(float(i), text)
    values = {e: evaluate(e, scrapes, 1, {"model_name": ".*", "__rate_interval": "5s"}) for e in expressions()
              if "label_values" not in e}
    kv = next(e for e in values if "vllm:kv_cache_usage_perc" in e)
    assert list(values[kv]) == [frozenset()] and 0.0 <= values[kv][frozenset()] <= 1.0
    phases = {dict(k)["phase"] for k in values[next(e for e in values if "conveyor_step_phase_seconds_sum" in e)]}
    assert phases == set() or phases == {"schedule", "execute", "output"}  # rate over an idle second may be 0
    guard = next(e for e in values if "conveyor_guard_actions_total" in e)
    assert {dict(k)["action"] for k in values[guard]} == {"redact_input"}
    limited = next(e for e in values if "conveyor_rate_limited_total" in e)
    assert any(dict(k).get("tenant") == "rpm" for k in values[limited])


def test_promql_lite_rate_sum_and_quantile_on_known_series():
    def scrape(count: float, below_1: float) -> str:
        return ("# TYPE x_seconds histogram\n"
                f'x_seconds_bucket{{m="a",le="0.5"}} 0\nx_seconds_bucket{{m="a",le="1.0"}} {below_1}\n'
                f'x_seconds_bucket{{m="a",le="+Inf"}} {count}\nx_seconds_count{{m="a"}} {count}\n'
                f'x_seconds_sum{{m="a"}} {count}\n'
                "# TYPE r counter\n"
                f'r_total{{m="a",k="p"}} {count}\nr_total{{m="b",k="p"}} {2 * count}\n')

    s = Scrapes([], [])
    s.add(0.0, scrape(0, 0))
    s.add(10.0, scrape(100, 50))  # 100 new observations, 50 in (0.5, 1], 50 above 1
    assert evaluate('sum by (k) (rate(r_total{m=~"$m"}[15s]))', s, 1, {"m": ".*"}) == {frozenset({("k", "p")}): 30.0}
    assert evaluate('sum(rate(r_total{m="b"}[15s])) / 2', s, 1) == {frozenset(): 10.0}
    q = evaluate("histogram_quantile(0.25, sum by (le) (rate(x_seconds_bucket[15s])))", s, 1)
    assert q == {frozenset(): pytest.approx(0.75)}  # halfway through the (0.5, 1] bucket
    assert evaluate("histogram_quantile(0.9, sum by (le) (rate(x_seconds_bucket[15s])))", s, 1) == \
        {frozenset(): 1.0}  # in the +Inf bucket: its lower bound, as Prometheus
