"""Per-request cost of observability in the server: the request's trace object through the
gateway's phases (auth, input guards, route, rate limit, cache lookup, settle), then its end
(span attributes, the engine's queue/prefill/decode child spans, the summary log line).

    python -m benchmarks.tracing_overhead [--requests 20000]

Cases: tracing off (the default: no span object is created), tracing on (SDK TracerProvider,
BatchSpanProcessor, an exporter that drops the spans: the cost on the request's path, not the
network), and the summary log line written (JSON formatter to memory) vs not. Prints
microseconds per request, the median of 5 runs."""
from __future__ import annotations

import argparse
import io
import logging
import statistics
import time

from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from server.log_format import JsonFormatter
from server.request_trace import RequestTrace, summary_logger

PHASES = ("auth", "input_guards", "route", "rate_limit", "cache_lookup", "settle")


class _DropExporter:
    """A SpanExporter that drops everything (the export itself is off the request's path)."""

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _output(now: float) -> RequestOutput:
    m = RequestMetrics(arrival_time=now - 1.0, first_scheduled_time=now - 0.9, first_token_time=now - 0.8,
                       finished_time=now)
    return RequestOutput("r", None, list(range(200)), [CompletionOutput(0, "x" * 100, list(range(64)), "stop")],
                         True, m, num_cached_tokens=64)


def one_request(tracing, i: int) -> None:
    trace = RequestTrace.begin(tracing, f"req-{i}", True, {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-"
                                                                          "00f067aa0ba902b7-01"})
    trace.tenant, trace.model, trace.route, trace.max_tokens, trace.temperature = "acme", "m", "explicit", 64, 0.7
    for name in PHASES:
        with trace.phase(name):
            pass
    trace.out = _output(time.time())
    trace.end()


def measure(tracing, n: int) -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(n):
            one_request(tracing, i)
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    args = p.parse_args(argv)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from server.tracing import Tracing

    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(BatchSpanProcessor(_DropExporter(), max_queue_size=1 << 16))
    on = Tracing(provider, provider.get_tracer("bench"), TraceContextTextMapPropagator())
    sink = logging.StreamHandler(io.StringIO())
    sink.setFormatter(JsonFormatter())
    summary_logger.propagate = False
    results = {}
    for logs in (False, True):
        summary_logger.handlers = [sink] if logs else []
        summary_logger.setLevel(logging.INFO if logs else logging.WARNING)
        for name, tracing in (("off", None), ("on", on)):
            results[(name, logs)] = measure(tracing, args.requests)
            print(f"tracing {name:3s}, summary log line {'written' if logs else 'off    '}: "
                  f"{results[(name, logs)]:7.2f} us/request", flush=True)
    provider.shutdown()
    print(f"tracing adds {results[('on', False)] - results[('off', False)]:.1f} us per request "
          f"({len(PHASES)} phase spans + 3 engine-phase spans + root)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
