"""Where telemetry goes: the Prometheus endpoint, OTLP exporters, the tracer provider, and W3C trace
context carried in Kafka headers (one ``elbert.message`` span per message, child of the input's
``traceparent``). Used by ``metrics.Telemetry``; nothing global is set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from elbert_stream.config import TelemetrySettings
from elbert_stream.errors import ConfigError
from elbert_stream.types import TRACE_HEADERS, Headers


class _HeaderGetter(Getter[Headers]):
    """Reads W3C trace context from Kafka headers (list of (str, bytes)); the last value wins."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        values = [v.decode("latin-1") for k, v in carrier if k.lower() == key and v is not None]
        return values[-1:] or None

    def keys(self, carrier: Headers) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _HeaderGetter()
_PROPAGATOR = TraceContextTextMapPropagator()


def pass_through(headers: Headers | None) -> Headers:
    return [(k, v) for k, v in headers or () if k.lower() in TRACE_HEADERS and v is not None]


def _parse_otlp_headers(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, item in enumerate(filter(None, (p.strip() for p in raw.split(",")))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"telemetry.otlp_headers entry #{i + 1} is not 'key=value' (value not shown)")
        out[key.strip()] = value.strip()
    return out


def prometheus_reader(settings: TelemetrySettings) -> tuple[MetricReader, Any, Any]:
    """A reader on a private registry served on ``prometheus_host:prometheus_port``; returns it with
    the HTTP server and its thread (close both on shutdown). Raises ConfigError if the port is taken."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()  # private: no global registry, several instances per process
    reader = PrometheusMetricReader(
        scope_info_enabled=False,
        resource_attribute_filter=lambda key: key == "service.instance.id",
        registry=registry,
    )
    host, port = settings.prometheus_host, settings.prometheus_port
    if port is None:
        raise ConfigError("prometheus_reader needs telemetry.prometheus_port (0 = any free port)")
    try:
        http, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ConfigError(f"cannot serve Prometheus metrics on {host}:{port}: {e}") from e
    return reader, http, thread


def otlp_exporters(settings: TelemetrySettings) -> tuple[MetricReader, SpanExporter]:
    """The OTLP/HTTP metric reader and span exporter for ``otlp_endpoint`` (the ``[otlp]`` extra)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise ConfigError(
            f"telemetry.otlp_endpoint={settings.otlp_endpoint!r} needs opentelemetry-exporter-otlp-"
            "proto-http: pip install 'elbert-stream[otlp]'"
        ) from e
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    base = str(settings.otlp_endpoint).rstrip("/")
    secret = settings.otlp_headers
    headers = _parse_otlp_headers(secret.get_secret_value()) if secret else None
    interval_ms = settings.otlp_export_interval_s * 1e3
    metrics = OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=headers)
    reader = PeriodicExportingMetricReader(metrics, export_interval_millis=interval_ms)
    return reader, OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=headers)


def tracer_provider(settings: TelemetrySettings, resource: Resource, exporters: Sequence[SpanExporter], *,
                    sync: Sequence[SpanExporter] = ()) -> TracerProvider:
    """Parent-based ratio sampling; exporters in ``sync`` get a synchronous processor (tests)."""
    sampler = ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))
    provider = TracerProvider(resource=resource, sampler=sampler)
    for exporter in exporters:
        processor = SimpleSpanProcessor(exporter) if exporter in sync else BatchSpanProcessor(exporter)
        provider.add_span_processor(processor)
    return provider


def message_span(
    tracer: Tracer,
    headers: Headers | None,
    start_ns: int,
    end_ns: int,
    own: dict[str, AttributeValue],
    extra: Mapping[str, AttributeValue] | None,
    events: Sequence[tuple[str, int]],
    status: Status | None,
) -> Headers:
    """One CONSUMER span, child of the input's traceparent; returns its trace-context headers."""
    parent = _PROPAGATOR.extract(headers, getter=_GETTER) if headers else Context()
    span = tracer.start_span("elbert.message", parent, SpanKind.CONSUMER, start_time=start_ns)
    if span.is_recording():
        span.set_attributes({"messaging.system": "kafka", **own, **(extra or {})})
        for name, at_ns in events:
            span.add_event(name, timestamp=at_ns)
        if status is not None:
            span.set_status(status)
    span.end(end_time=end_ns)
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, set_span_in_context(span))
    return [(k, v.encode("latin-1")) for k, v in carrier.items()]
