"""OpenTelemetry metrics and traces for one worker replica; docs/telemetry.md lists every metric.

API for the worker and the Serve deployment (nothing global is set, at import or ever)::

    tel = Telemetry(settings.telemetry, replica_id="r0", num_layers=12)
    tel.start(stats=worker.telemetry_snapshot)  # -> StatsSnapshot, read only when metrics are collected
    out_headers = tel.record_prediction(pred, in_headers, source_timestamp_ms=rec.timestamp)
    out_headers = tel.record_dead_letter("not_utf8", in_headers)      # or outcome="error"
    tel.summary().to_dict()            # GET /stats and the demo: the same numbers as the metrics
    tel.prometheus_port                # the bound port (useful with prometheus_port=0); None if off
    tel.shutdown()                     # flushes OTLP, frees the port; idempotent

Per message only a few counter/histogram records run; gauges and the layer-steps counter are read
from ``stats()`` (cheap, thread-safe) when a reader collects. ``summary()`` is fed by the same
``record_*`` calls with the same buckets; its percentiles follow PromQL's ``histogram_quantile``.
``record_*`` return the W3C ``traceparent``/``tracestate`` headers for the output record: those of a
new ``elbert.message`` span (child of the input's ``traceparent``) when tracing is on (OTLP endpoint
or ``span_exporters``; parent-based ratio sampling), else the input's own, passed through.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeter, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import NoOpTracer, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from elbert_stream.config import TelemetrySettings
from elbert_stream.errors import ConfigError, ElbertError
from elbert_stream.telemetry.exporters import (
    message_span,
    otlp_exporters,
    pass_through,
    prometheus_reader,
    tracer_provider,
)
from elbert_stream.telemetry.summary import (  # noqa: F401 - re-exported: the telemetry API in one place
    LATENCY_BUCKETS_S,
    LATENCY_METRICS,
    Hist,
    LatencySummary,
    StatsSnapshot,
    StatsSource,
    TelemetrySummary,
    histogram_quantile,
)
from elbert_stream.types import Headers, Prediction

logger = logging.getLogger(__name__)

Outcome = Literal["ok", "dead_letter", "error"]
MAX_REASONS = 32  # distinct (outcome, reason) pairs kept as label values; later ones read "other"


class Telemetry:
    """Metrics, traces and the summary of one replica: build, ``start()``, record, ``shutdown()``."""

    def __init__(
        self,
        settings: TelemetrySettings,
        *,
        replica_id: str,
        num_layers: int,
        span_exporters: Sequence[SpanExporter] = (),
    ) -> None:
        """``span_exporters``: extra exporters behind a synchronous processor (tests, in-process use)."""
        if num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {num_layers!r}")
        self.settings, self.replica_id, self.num_layers = settings, replica_id, num_layers
        self._span_exporters = tuple(span_exporters)
        self._stats: StatsSource | None = None
        self._started = False
        self._meters: MeterProvider | None = None
        self._tracers: TracerProvider | None = None
        self._tracer: Tracer = NoOpTracer()
        self._http: Any = None
        self._http_thread: Any = None
        self._lock = threading.Lock()
        self._depths = Hist([float(d) for d in range(1, num_layers + 1)])
        self._latency = {key: Hist(LATENCY_BUCKETS_S) for key in LATENCY_METRICS}
        self._messages: dict[tuple[str, str], int] = {}  # (outcome, reason label) -> count
        self._attrs: dict[tuple[str, str], dict[str, str]] = {("ok", ""): {"outcome": "ok"}}

    # lifecycle -------------------------------------------------------------------------------------
    def start(self, stats: StatsSource | None = None) -> Telemetry:
        """Build providers and exporters, open the Prometheus port. Raises ConfigError if it cannot."""
        if self._started:
            raise ElbertError(f"Telemetry({self.replica_id!r}) already started")
        self._stats = stats if stats is not None else self._stats
        resource = Resource.create(
            {"service.name": self.settings.service_name, "service.instance.id": self.replica_id}
        )
        readers: list[MetricReader] = []
        span_exporters = list(self._span_exporters)
        if self.settings.otlp_endpoint:
            metric_reader, span_exporter = otlp_exporters(self.settings)
            readers.append(metric_reader)
            span_exporters.append(span_exporter)
        if self.settings.prometheus_port is not None:
            reader, self._http, self._http_thread = prometheus_reader(self.settings)
            readers.append(reader)
        meter: Meter = NoOpMeter("elbert_stream")
        if readers:  # no reader: no SDK instruments at all, only the summary counters
            exemplars = AlwaysOffExemplarFilter()
            self._meters = MeterProvider(metric_readers=readers, resource=resource, exemplar_filter=exemplars)
            meter = self._meters.get_meter("elbert_stream")
        self._create_instruments(meter)
        if span_exporters:
            self._tracers = tracer_provider(self.settings, resource, span_exporters,
                                            sync=self._span_exporters)
            self._tracer = self._tracers.get_tracer("elbert_stream")
        self._started = True
        logger.info(
            "telemetry %s: prometheus port %s, otlp %s, tracing %s",
            self.replica_id, self.prometheus_port, bool(self.settings.otlp_endpoint), self.tracing_enabled,
        )  # fmt: skip
        return self

    def set_stats(self, stats: StatsSource) -> None:
        """Set (or replace) the snapshot source read at collection time."""
        self._stats = stats

    def shutdown(self) -> None:
        """Flush exporters, close the HTTP server and free its port. Safe to call twice."""
        self._started = False
        if self._tracers is not None:
            self._tracers.shutdown()
            self._tracers, self._tracer = None, NoOpTracer()
        if self._meters is not None:
            self._meters.shutdown()  # also unregisters the Prometheus collector
            self._meters = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http_thread.join(timeout=5)
            self._http = self._http_thread = None

    def __enter__(self) -> Telemetry:
        return self if self._started else self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

    @property
    def prometheus_port(self) -> int | None:
        """The port /metrics is served on (the picked one when configured as 0); None when off."""
        return None if self._http is None else int(self._http.server_port)

    @property
    def tracing_enabled(self) -> bool:
        return self._tracers is not None

    # recording -------------------------------------------------------------------------------------
    def record_prediction(
        self,
        prediction: Prediction,
        headers: Headers | None = None,
        *,
        source_timestamp_ms: int | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Headers:
        """Record one finished message; returns the trace headers for its output record.

        End-to-end latency is now minus the input record's Kafka timestamp when given (clamped at 0),
        else queue + compute time. The span covers [now - queue - compute, now].
        """
        self._check_started()
        now_ns = time.time_ns()
        queue_s, compute_s = max(prediction.queue_s, 0.0), max(prediction.compute_s, 0.0)
        e2e_s = queue_s + compute_s
        if source_timestamp_ms is not None and source_timestamp_ms >= 0:
            e2e_s = max(now_ns / 1e9 - source_timestamp_ms / 1e3, 0.0)
        depth = prediction.exit_depth
        with self._lock:
            self._depths.add(depth)
            for key, value in (("end_to_end", e2e_s), ("queue", queue_s), ("compute", compute_s)):
                self._latency[key].add(value)
                self._histograms[key].record(value)
            self._messages[("ok", "")] = self._messages.get(("ok", ""), 0) + 1
        self._exit_depth.record(depth)
        self._counter.add(1, self._attrs[("ok", "")])
        if self._tracers is None:
            return pass_through(headers)
        own: dict[str, AttributeValue] = {
            "elbert.request_id": prediction.request_id,
            "elbert.exit_depth": depth,
            "elbert.exit_reason": prediction.exit_reason,
            "elbert.label": prediction.label,
        }
        admitted_ns = now_ns - int(compute_s * 1e9)
        events = (("admitted", admitted_ns), ("exited", now_ns))
        start_ns = admitted_ns - int(queue_s * 1e9)
        return message_span(self._tracer, headers, start_ns, now_ns, own, attributes, events, None)

    def record_dead_letter(
        self,
        reason: str,
        headers: Headers | None = None,
        *,
        outcome: Outcome = "dead_letter",
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Headers:
        """Record a message that produced no prediction; returns the trace headers for its dead letter.

        ``reason`` must be a short code (``BadMessage.reason``), never message content: it becomes a
        label value. Beyond ``MAX_REASONS`` distinct (outcome, reason) pairs, new reasons read "other".
        """
        self._check_started()
        if outcome not in ("dead_letter", "error"):
            raise ElbertError(f"outcome must be 'dead_letter' or 'error', got {outcome!r}")
        with self._lock:
            attrs = self._attrs.get((outcome, reason))
            if attrs is None:
                label = reason if len(self._attrs) <= MAX_REASONS else "other"
                attrs = self._attrs[(outcome, reason)] = {"outcome": outcome, "reason": label}
            key = (outcome, attrs["reason"])
            self._messages[key] = self._messages.get(key, 0) + 1
        self._counter.add(1, attrs)
        if self._tracers is None:
            return pass_through(headers)
        now_ns = time.time_ns()
        own: dict[str, AttributeValue] = {"elbert.outcome": outcome, "elbert.reason": attrs["reason"]}
        status = Status(StatusCode.ERROR, reason)
        return message_span(self._tracer, headers, now_ns, now_ns, own, attributes, (), status)

    def summary(self) -> TelemetrySummary:
        """The numbers the metrics expose (calls ``stats()`` once for the gauges)."""
        snap = self._snapshot() or StatsSnapshot()
        with self._lock:
            messages = {"ok": 0, "dead_letter": 0, "error": 0}
            reasons: dict[str, int] = {}
            for (outcome, reason), n in self._messages.items():
                messages[outcome] += n
                if outcome != "ok":
                    reasons[f"{outcome}/{reason}"] = reasons.get(f"{outcome}/{reason}", 0) + n
            depths = self._depths
            return TelemetrySummary(
                replica_id=self.replica_id,
                messages=messages,
                reasons=reasons,
                exit_depth_counts=depths.counts[: self.num_layers],
                mean_exit_depth=depths.total / depths.n if depths.n else None,
                latency={key: hist.latency() for key, hist in self._latency.items()},
                layer_steps=snap.layer_steps,
                busy_slots=snap.busy_slots,
                queue_depth=snap.queue_depth,
                pending_layer_work=snap.pending_layer_work,
                consumer_lag={f"{t}[{p}]": lag for (t, p), lag in snap.consumer_lag.items()},
                exit_gear=snap.exit_gear,
            )

    # internals -------------------------------------------------------------------------------------
    def _check_started(self) -> None:
        if not self._started:
            raise ElbertError(f"Telemetry({self.replica_id!r}) is not started (or already shut down)")

    def _create_instruments(self, meter: Meter) -> None:
        depths = [float(d) for d in range(1, self.num_layers + 1)]
        self._exit_depth = meter.create_histogram(
            "elbert_exit_depth", "{layer}", "shared-layer applications before exit, per message",
            explicit_bucket_boundaries_advisory=depths,
        )  # fmt: skip
        self._histograms = {
            key: meter.create_histogram(name, "s", doc, explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
            for key, (name, doc) in LATENCY_METRICS.items()
        }
        self._counter = meter.create_counter(
            "elbert_messages_total", "{message}", "input messages by outcome (ok, dead_letter, error)"
        )
        meter.create_observable_counter(
            "elbert_layer_steps_total", [self._observe("layer_steps")], "{layer}",
            "sample-layer applications: one per busy slot per engine step",
        )  # fmt: skip
        for name, attr, unit, doc in (
            ("elbert_busy_slots", "busy_slots", "{slot}", "occupied engine slots"),
            ("elbert_queue_depth", "queue_depth", "{request}", "requests waiting for a slot"),
            ("elbert_pending_layer_work", "pending_layer_work", "{layer}", "expected layer work left"),
            ("elbert_parked_records", "parked_records", "{record}",
             "records not writable yet (e.g. dead-letter topic refused), retried with backoff"),
            ("elbert_held_partitions", "held_partitions", "{partition}",
             "input partitions paused behind parked records"),
            ("elbert_exit_gear", "exit_gear", "{gear}",
             "exit gear in force: 0 = default thresholds, k = k-th looser gear (adaptive exit)"),
        ):
            meter.create_observable_gauge(name, [self._observe(attr)], unit, doc)
        meter.create_observable_gauge(
            "elbert_consumer_lag", [self._observe_lag], "{message}", "input records not yet consumed"
        )

    def _snapshot(self) -> StatsSnapshot | None:
        if self._stats is None:
            return None
        try:
            return self._stats()
        except Exception:  # a broken stats() must not break a scrape
            logger.warning("telemetry %s: stats() failed", self.replica_id, exc_info=True)
            return None

    def _observe(self, attr: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            snap = self._snapshot()
            return [] if snap is None else [Observation(getattr(snap, attr))]

        return callback

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        snap = self._snapshot()
        lags = {} if snap is None else snap.consumer_lag
        return [Observation(lag, {"topic": t, "partition": str(p)}) for (t, p), lag in lags.items()]
