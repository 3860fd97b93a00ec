"""Prometheus metrics with vLLM-compatible names (so existing dashboards and the Kubernetes
Gateway API Inference Extension work unchanged) plus Conveyor's own `conveyor_` metrics.

Every engine series carries a `model_name` label (vLLM's), one sample per served model: the
gauges `vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`
and the counters are read from each model's own engine at scrape time; request histograms are
observed by the server as requests progress; step histograms are observed on each engine's
thread (prometheus_client metrics are thread-safe). Each `ServerMetrics` owns its registry, so
several servers in one process never share counters.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.outputs import EngineStats, RequestOutput
from engine.progress import ProgressSnapshot
from server.gpu_metrics import GpuCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ABORT = "abort"  # finished_reason of requests that ended before the engine finished them
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_STEP_PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                       0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS_PER_SECOND_WINDOW = 5.0  # seconds of steps averaged by conveyor_generation_tokens_per_second


@dataclass
class ModelMetrics:
    """The metrics of one served model. `name` is a callable because the model's name may be
    known only once its engine has loaded."""

    server: "ServerMetrics"
    name: Callable[[], str]
    get_stats: Callable[[], EngineStats]
    prefix_caching: bool
    progress: Callable[[], ProgressSnapshot] | None = None  # the engine's step-loop progress
    _window: collections.deque = field(default_factory=collections.deque)
    _steps_seen: int = 0  # the engine's step count at the last observed step

    # ---- engine thread ------------------------------------------------------------------
    def observe_step(self, duration: float, stats: EngineStats) -> None:
        model = self.name()
        self.server.step_time.labels(model).observe(duration)
        self.server.batch_size.labels(model).observe(stats.last_batch_size)
        if stats.num_steps != self._steps_seen:  # a step that ran the model: its phases are fresh
            self._steps_seen = stats.num_steps
            phase = self.server.step_phase
            phase.labels(model, "schedule").observe(stats.last_schedule_time)
            phase.labels(model, "execute").observe(stats.last_execute_time)
            phase.labels(model, "output").observe(stats.last_output_time)
        now = time.monotonic()
        self._window.append((now, stats.generation_tokens))
        while len(self._window) > 2 and now - self._window[0][0] > _TOKENS_PER_SECOND_WINDOW:
            self._window.popleft()

    def tokens_per_second(self) -> float:
        window = list(self._window)  # a copy: the engine thread appends concurrently
        if len(window) < 2 or window[-1][0] - window[0][0] <= 0:
            return 0.0
        if time.monotonic() - window[-1][0] > _TOKENS_PER_SECOND_WINDOW:
            return 0.0  # idle
        return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])

    # ---- event loop ---------------------------------------------------------------------
    def observe_token_gap(self, seconds: float) -> None:
        self.server.itl.labels(self.name()).observe(seconds)

    def observe_finished(self, out: RequestOutput | None, finish_reason: str) -> None:
        """Counts a request that ended, by finish reason; `out` (its last output) None when
        it ended before any."""
        model = self.name()
        s = self.server
        s.request_success.labels(model, finish_reason).inc()
        if out is None:
            return
        m = out.metrics
        if m.time_to_first_token is not None:
            s.ttft.labels(model).observe(m.time_to_first_token)
        if m.queue_time is not None:
            s.queue_time.labels(model).observe(m.queue_time)
        end = m.finished_time if m.finished_time is not None else time.time()
        s.e2e.labels(model).observe(max(0.0, end - m.arrival_time))

    def rejected(self, reason: str) -> None:
        self.server.rejected.labels(reason).inc()


class _EngineCollector:
    """Turns every served model's engine stats snapshot into metric families at each scrape:
    one family per metric, one sample per model."""

    def __init__(self, models: list[ModelMetrics]) -> None:
        self._models = models  # the server's list: models added later are included

    def collect(self):
        snapshots = [(m, m.name(), m.get_stats()) for m in self._models]

        def family(kind, name: str, doc: str, value: Callable[[ModelMetrics, EngineStats], float]):
            f = kind(name, doc, labels=["model_name"])
            for m, model, s in snapshots:
                f.add_metric([model], value(m, s))
            return f

        def gauge(name, doc, value):
            return family(GaugeMetricFamily, name, doc, value)

        def counter(name, doc, value):
            return family(CounterMetricFamily, name, doc, value)

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", lambda m, s: s.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", lambda m, s: s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                    lambda m, s: s.kv_cache_usage)
        yield gauge("vllm:gpu_cache_usage_perc", "Alias of vllm:kv_cache_usage_perc for older dashboards.",
                    lambda m, s: s.kv_cache_usage)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      lambda m, s: s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      lambda m, s: s.prefix_cache_hits)
        yield counter("vllm:num_preemptions", "Requests preempted to free KV blocks.",
                      lambda m, s: s.num_preemptions)
        yield counter("vllm:prompt_tokens", "Prompt tokens processed.", lambda m, s: s.prompt_tokens)
        yield counter("vllm:generation_tokens", "Tokens generated.", lambda m, s: s.generation_tokens)
        info = GaugeMetricFamily("vllm:cache_config_info", "KV cache configuration.",
                                 labels=["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching"])
        for m, model, s in snapshots:
            info.add_metric([model, str(s.block_size), str(s.num_blocks), str(m.prefix_caching)], 1.0)
        yield info
        run = GaugeMetricFamily("conveyor_model_config_info", "How the model runs: weights/compute dtype, "
                                "the linear layers' GEMM and the attention kernel (chosen at start; "
                                "the log says why).", labels=["model_name", "dtype", "linear_backend",
                                                              "attention_backend"])
        for m, model, s in snapshots:
            if s.dtype:  # loaded
                run.add_metric([model, s.dtype, s.linear_backend, s.attention_backend], 1.0)
        yield run
        yield gauge("conveyor_num_waiting_tokens", "Prompt tokens of waiting requests.",
                    lambda m, s: s.num_waiting_tokens)
        yield counter("conveyor_engine_steps", "Engine steps run.", lambda m, s: s.num_steps)
        yield gauge("conveyor_generation_tokens_per_second",
                    f"Generated tokens per second over the last {_TOKENS_PER_SECOND_WINDOW:g}s.",
                    lambda m, s: m.tokens_per_second())
        progress = [(model, m.progress()) for m, model, _ in snapshots if m.progress is not None]
        age = GaugeMetricFamily("conveyor_engine_last_step_age_seconds",
                                "Seconds since the engine last completed a step (or started).", labels=["model_name"])
        stall = GaugeMetricFamily("conveyor_engine_stall_seconds", "Seconds work has been pending with no "
                                  "engine step completing (0 when idle); /health answers 503 above "
                                  "--health-stall-seconds.", labels=["model_name"])
        for model, p in progress:
            age.add_metric([model], p.last_step_age)
            stall.add_metric([model], p.stall_seconds)
        yield age
        yield stall


class ServerMetrics:
    """All metrics of one server. Per-model series come from `for_model`; tenant-labelled
    series live in `tenant_registry`, rendered only on the admin metrics route."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tenant_registry = CollectorRegistry()
        self._models: list[ModelMetrics] = []
        r = self.registry
        self.request_success = Counter(
            "vllm:request_success", "Finished requests by finish reason (abort: the client left, "
            "the request timed out or the server stopped it).",
            ["model_name", "finished_reason"], registry=r)

        def per_model(name: str, doc: str, buckets: tuple = _LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=r)

        self.ttft = per_model("vllm:time_to_first_token_seconds", "Time to first token.")
        self.itl = per_model("vllm:inter_token_latency_seconds", "Time between output tokens.")
        self.e2e = per_model("vllm:e2e_request_latency_seconds", "Request latency end to end.")
        self.queue_time = per_model("vllm:request_queue_time_seconds", "Time spent waiting.")
        self.step_time = per_model("conveyor_step_time_seconds", "Duration of one engine step.")
        self.batch_size = per_model("conveyor_batch_size", "Requests in one engine step.", _BATCH_BUCKETS)
        self.step_phase = Histogram(
            "conveyor_step_phase_seconds", "Time of one engine step by phase: schedule (Python scheduling: "
            "schedule() + update_from_output()), execute (the model runner: forward pass and sampling), "
            "output (detokenizing, stop strings, building outputs).",
            ["model_name", "phase"], buckets=_STEP_PHASE_BUCKETS, registry=r)
        self.rejected = Counter("conveyor_requests_rejected", "Requests refused by backpressure.",
                                ["reason"], registry=r)
        self.rejected.labels("queue_full")  # exported at 0 from the start, so rate() sees the first one
        self.http_requests = Counter("conveyor_http_requests", "HTTP requests by route and status "
                                     "(499: the client disconnected first).", ["route", "status"], registry=r)
        r.register(_EngineCollector(self._models))
        r.register(GpuCollector())
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

    def for_model(self, name: Callable[[], str], get_stats: Callable[[], EngineStats],
                  prefix_caching: bool = True,
                  progress: Callable[[], ProgressSnapshot] | None = None) -> ModelMetrics:
        """The metrics of one more served model; its engine series appear at the next scrape."""
        model = ModelMetrics(self, name, get_stats, prefix_caching, progress)
        self._models.append(model)
        return model

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def render_tenants(self) -> bytes:
        return generate_latest(self.tenant_registry)
