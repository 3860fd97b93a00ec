"""OpenTelemetry tracing of generation requests: off unless an OTLP endpoint is configured.

`build_tracing` decides once, when the app is built: with no endpoint (`--otlp-traces-endpoint`,
or the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`) and no
exporter given it returns None, the OpenTelemetry SDK is never imported and no request creates
a span object (server/request_trace.py checks `span is None` and does nothing). With one, spans
go through a `BatchSpanProcessor` (export on a background thread) to the OTLP/HTTP exporter of
`opentelemetry-exporter-otlp-proto-http`, imported only then. `OTEL_SERVICE_NAME` (and
`OTEL_RESOURCE_ATTRIBUTES`) name the service, `conveyor` by default; `OTEL_SDK_DISABLED=true`
turns tracing off whatever else is set.

Incoming W3C `traceparent` / `tracestate` headers are honoured: the request's span is a child
of the caller's, so a gateway's trace continues into ours. The provider is the app's own (never
the global one), so several servers in one process keep their spans apart.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("conveyor.server")
DEFAULT_SERVICE_NAME = "conveyor"


@dataclass
class Tracing:
    """The app's tracer. `begin` starts a request's root span (SERVER kind), parented by the
    request's `traceparent` when it has a valid one."""

    provider: Any  # opentelemetry.sdk.trace.TracerProvider
    tracer: Any
    propagator: Any

    def begin(self, name: str, headers: Any, start_ns: int) -> Any:
        from opentelemetry.trace import SpanKind

        carrier = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
        parent = self.propagator.extract(carrier) if carrier else None
        return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, start_time=start_ns)

    def child(self, parent: Any, name: str, start_ns: int | None = None) -> Any:
        from opentelemetry.trace import set_span_in_context

        return self.tracer.start_span(name, context=set_span_in_context(parent), start_time=start_ns)

    def shutdown(self) -> None:
        """Flushes spans still queued (bounded by the processor's own timeout)."""
        try:
            self.provider.shutdown()
        except Exception:  # noqa: BLE001 - a collector that is down must not break shutdown
            logger.exception("tracing shutdown failed")


def traces_endpoint(flag: str | None) -> str | None:
    """The OTLP/HTTP traces URL: the flag, else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as it
    is), else OTEL_EXPORTER_OTLP_ENDPOINT + `/v1/traces` (as the OTLP spec says); a flag or
    base endpoint without a path gets `/v1/traces`. None when tracing is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if flag:
        return _with_traces_path(flag)
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return base.rstrip("/") + "/v1/traces" if base else None


def _with_traces_path(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    has_path = "/" in (rest if sep else scheme).strip("/")
    return url if has_path else url.rstrip("/") + "/v1/traces"


def build_tracing(endpoint_flag: str | None = None, exporter: Any = None) -> Tracing | None:
    """The app's tracing, or None (off: nothing imported, nothing created per request).
    `exporter` (a SpanExporter, e.g. the SDK's InMemorySpanExporter in tests) turns tracing on
    with a synchronous processor, whatever the endpoint."""
    endpoint = traces_endpoint(endpoint_flag)
    if exporter is None and endpoint is None:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValueError("tracing needs the OTLP exporter: pip install "
                             "'opentelemetry-exporter-otlp-proto-http' (or conveyor[otel])") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        logger.info("tracing: OTLP/HTTP spans to %s as service %s", endpoint,
                    resource.attributes.get(SERVICE_NAME))
    return Tracing(provider, provider.get_tracer("conveyor.server"), TraceContextTextMapPropagator())
