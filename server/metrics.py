"""Prometheus metrics with vLLM-compatible names (so existing dashboards and the Kubernetes
Gateway API Inference Extension work unchanged) plus Conveyor's own `conveyor_` metrics.

Engine gauges and counters are read from the engine's latest stats snapshot at scrape time;
request histograms are observed by the server as requests progress; step metrics are observed
on the engine thread (prometheus_client metrics are thread-safe). Each `ServerMetrics` owns
its registry, so several servers in one process never share counters.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.outputs import EngineStats, RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS_PER_SECOND_WINDOW = 5.0  # seconds of steps averaged by conveyor_generation_tokens_per_second


class _EngineCollector:
    """Turns the engine's stats snapshot into metric families at each scrape."""

    def __init__(self, get_stats: Callable[[], EngineStats], model_name: Callable[[], str],
                 prefix_caching: bool, tokens_per_second: Callable[[], float]) -> None:
        self._get_stats = get_stats
        self._model_name = model_name
        self._prefix_caching = prefix_caching
        self._tokens_per_second = tokens_per_second

    def collect(self):
        s = self._get_stats()
        model = self._model_name()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([model], value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                    s.kv_cache_usage)
        yield gauge("vllm:gpu_cache_usage_perc", "Alias of vllm:kv_cache_usage_perc for older "
                    "dashboards.", s.kv_cache_usage)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      s.prefix_cache_hits)
        yield counter("vllm:num_preemptions", "Requests preempted to free KV blocks.",
                      s.num_preemptions)
        yield counter("vllm:prompt_tokens", "Prompt tokens processed.", s.prompt_tokens)
        yield counter("vllm:generation_tokens", "Tokens generated.", s.generation_tokens)
        info = GaugeMetricFamily("vllm:cache_config_info", "KV cache configuration.",
                                 labels=["block_size", "num_gpu_blocks", "enable_prefix_caching"])
        info.add_metric([str(s.block_size), str(s.num_blocks), str(self._prefix_caching)], 1.0)
        yield info
        yield gauge("conveyor_num_waiting_tokens", "Prompt tokens of waiting requests.",
                    s.num_waiting_tokens)
        yield counter("conveyor_engine_steps", "Engine steps run.", s.num_steps)
        yield gauge("conveyor_generation_tokens_per_second",
                    f"Generated tokens per second over the last {_TOKENS_PER_SECOND_WINDOW:g}s.",
                    self._tokens_per_second())
        yield from _gpu_metrics()


def _gpu_metrics():
    """GPU memory and utilization, only when CUDA is present."""
    import torch

    if not torch.cuda.is_available():
        return
    mem = GaugeMetricFamily("conveyor_gpu_memory_used_bytes", "GPU memory allocated by torch.",
                            labels=["device"])
    util = GaugeMetricFamily("conveyor_gpu_utilization_percent", "GPU utilization (NVML).",
                             labels=["device"])
    for i in range(torch.cuda.device_count()):
        mem.add_metric([str(i)], torch.cuda.memory_allocated(i))
        try:
            util.add_metric([str(i)], torch.cuda.utilization(i))
        except Exception:  # noqa: BLE001 - NVML is optional; skip utilization without it
            pass
    yield mem
    yield util


class ServerMetrics:
    """All metrics of one server. `model_name` is a callable because the engine (and so the
    model's name) may still be loading when the server starts."""

    def __init__(self, get_stats: Callable[[], EngineStats], model_name: Callable[[], str],
                 prefix_caching: bool = True) -> None:
        self.registry = CollectorRegistry()
        self._model_name = model_name
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        r = self.registry
        self.request_success = Counter(
            "vllm:request_success", "Finished requests by finish reason.",
            ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              ["model_name"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.",
                             ["model_name"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency end to end.",
                             ["model_name"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time spent waiting.",
                                    ["model_name"], buckets=_LATENCY_BUCKETS, registry=r)
        self.step_time = Histogram("conveyor_step_time_seconds", "Duration of one engine step.",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("conveyor_batch_size", "Requests in one engine step.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.rejected = Counter("conveyor_requests_rejected", "Requests refused by backpressure.",
                                ["reason"], registry=r)
        self.http_requests = Counter("conveyor_http_requests", "HTTP requests by route and status.",
                                     ["route", "status"], registry=r)
        r.register(_EngineCollector(get_stats, model_name, prefix_caching, self.tokens_per_second))

    # ---- engine thread ------------------------------------------------------------------
    def observe_step(self, duration: float, stats: EngineStats) -> None:
        self.step_time.observe(duration)
        self.batch_size.observe(stats.last_batch_size)
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
        self.itl.labels(self._model_name()).observe(seconds)

    def observe_finished(self, out: RequestOutput, finish_reason: str) -> None:
        model = self._model_name()
        m = out.metrics
        if m.time_to_first_token is not None:
            self.ttft.labels(model).observe(m.time_to_first_token)
        if m.queue_time is not None:
            self.queue_time.labels(model).observe(m.queue_time)
        end = m.finished_time if m.finished_time is not None else time.time()
        self.e2e.labels(model).observe(max(0.0, end - m.arrival_time))
        self.request_success.labels(model, finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
