"""Telemetry: real Prometheus scrapes on loopback, real spans (in-memory exporter), real OTLP/HTTP
requests to a dummy collector on 127.0.0.1. No network beyond loopback."""

from __future__ import annotations

import http.server
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from pydantic import SecretStr

from elbert_stream.config import TelemetrySettings
from elbert_stream.errors import ConfigError, ElbertError
from elbert_stream.telemetry.metrics import (
    LATENCY_BUCKETS_S,
    MAX_REASONS,
    StatsSnapshot,
    Telemetry,
    histogram_quantile,
)
from elbert_stream.types import Prediction

L = 6
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
LOCAL = {"prometheus_port": 0, "prometheus_host": "127.0.0.1"}


def prediction(depth: int, queue_s: float = 0.003, compute_s: float = 0.02, rid: str = "r") -> Prediction:
    return Prediction(rid, "sport", 1, [0.1, 0.9], depth, "window", [], queue_s, compute_s)


def traceparent(flags: str = "01") -> list[tuple[str, bytes]]:
    return [("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-{flags}".encode()), ("key", b"k")]


def scrape(port: int, openmetrics: bool = False) -> str:
    accept = "application/openmetrics-text; version=1.0.0" if openmetrics else "text/plain"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """sample name + labels (without service_instance_id) -> value."""
    out = {}
    for family in parse_text(text):
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "service_instance_id")
            out[(s.name, labels)] = s.value
    return out


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, frozenset(labels.items()))]


@pytest.fixture
def stats() -> dict[str, StatsSnapshot]:
    return {"now": StatsSnapshot(3, 5, 17.5, 1234, {("in", 0): 7, ("in", 2): 0}, exit_gear=2)}


@pytest.fixture
def prom(stats: dict[str, StatsSnapshot]) -> Iterator[Telemetry]:
    tel = Telemetry(TelemetrySettings(**LOCAL), replica_id="rep-1", num_layers=L)
    tel.start(stats=lambda: stats["now"])
    yield tel
    tel.shutdown()


def test_scrape_exposes_documented_names_units_and_values(prom: Telemetry) -> None:
    depths = [1, 2, 2, 3, 6, 6, 6]
    for i, d in enumerate(depths):
        prom.record_prediction(prediction(d, queue_s=0.001 * (i + 1), compute_s=0.0195))
    prom.record_dead_letter("not_utf8")
    prom.record_dead_letter("not_utf8")
    prom.record_dead_letter("engine", outcome="error")
    assert prom.prometheus_port is not None and prom.prometheus_port > 0
    got = samples(scrape(prom.prometheus_port))

    for d in range(1, L + 1):  # cumulative buckets le=1..L
        assert value(got, "elbert_exit_depth_bucket", le=f"{d:.1f}") == sum(x <= d for x in depths)
    assert value(got, "elbert_exit_depth_count") == len(depths)
    assert value(got, "elbert_exit_depth_sum") == sum(depths)
    assert value(got, "elbert_messages_total", outcome="ok", reason="") == len(depths)
    assert value(got, "elbert_messages_total", outcome="dead_letter", reason="not_utf8") == 2
    assert value(got, "elbert_messages_total", outcome="error", reason="engine") == 1
    assert value(got, "elbert_layer_steps_total") == 1234
    assert value(got, "elbert_busy_slots") == 3
    assert value(got, "elbert_queue_depth") == 5
    assert value(got, "elbert_pending_layer_work") == 17.5
    assert value(got, "elbert_exit_gear") == 2
    assert value(got, "elbert_consumer_lag", topic="in", partition="0") == 7
    assert value(got, "elbert_consumer_lag", topic="in", partition="2") == 0
    assert value(got, "elbert_queue_time_seconds_sum") == pytest.approx(0.001 * sum(range(1, 8)))
    assert value(got, "elbert_compute_time_seconds_count") == len(depths)
    e2e = [0.001 * (i + 1) + 0.0195 for i in range(len(depths))]  # no record timestamp: queue + compute
    assert value(got, "elbert_end_to_end_latency_seconds_bucket", le="0.025") == sum(x <= 0.025 for x in e2e)
    assert value(got, "elbert_end_to_end_latency_seconds_bucket", le="+Inf") == len(depths)

    families = {f.name: f for f in parse_openmetrics(scrape(prom.prometheus_port, openmetrics=True))}
    expected = {  # OpenMetrics family name -> (type, unit)
        "elbert_exit_depth": ("histogram", ""),
        "elbert_end_to_end_latency_seconds": ("histogram", "seconds"),
        "elbert_queue_time_seconds": ("histogram", "seconds"),
        "elbert_compute_time_seconds": ("histogram", "seconds"),
        "elbert_messages": ("counter", ""),
        "elbert_layer_steps": ("counter", ""),
        "elbert_busy_slots": ("gauge", ""),
        "elbert_queue_depth": ("gauge", ""),
        "elbert_pending_layer_work": ("gauge", ""),
        "elbert_consumer_lag": ("gauge", ""),
        "elbert_exit_gear": ("gauge", ""),
    }
    assert {n: (families[n].type, families[n].unit) for n in expected} == expected
    assert {s.name for s in families["elbert_messages"].samples} == {"elbert_messages_total"}
    assert {s.name for s in families["elbert_layer_steps"].samples} == {"elbert_layer_steps_total"}
    assert all(s.labels["service_instance_id"] == "rep-1" for s in families["elbert_busy_slots"].samples)


def test_summary_matches_the_scrape(prom: Telemetry, stats: dict[str, StatsSnapshot]) -> None:
    for i in range(40):
        prom.record_prediction(prediction(1 + i % L, queue_s=0.0005 * i, compute_s=0.01 + 0.002 * i))
    prom.record_prediction(prediction(2), source_timestamp_ms=int(time.time() * 1000) - 2000)
    prom.record_dead_letter("too_large")
    stats["now"] = StatsSnapshot(1, 0, 2.0, 99, {("in", 1): 4})
    summary = prom.summary()
    assert prom.prometheus_port is not None
    got = samples(scrape(prom.prometheus_port))

    cumulative = [value(got, "elbert_exit_depth_bucket", le=f"{d:.1f}") for d in range(1, L + 1)]
    assert summary.exit_depth_counts == [
        int(c - p) for c, p in zip(cumulative, [0.0, *cumulative], strict=False)
    ]
    assert summary.mean_exit_depth == pytest.approx(
        value(got, "elbert_exit_depth_sum") / value(got, "elbert_exit_depth_count")
    )
    assert summary.messages == {"ok": 41, "dead_letter": 1, "error": 0}
    assert summary.reasons == {"dead_letter/too_large": 1}
    for key, name in (
        ("compute", "elbert_compute_time_seconds"),
        ("end_to_end", "elbert_end_to_end_latency_seconds"),
    ):
        cum = [value(got, f"{name}_bucket", le=str(b)) for b in LATENCY_BUCKETS_S]
        cum.append(value(got, f"{name}_bucket", le="+Inf"))
        per_bucket = [int(c - p) for c, p in zip(cum, [0.0, *cum], strict=False)]
        lat = summary.latency[key]
        assert lat.count == value(got, f"{name}_count") == 41
        assert lat.p95_s == pytest.approx(histogram_quantile(0.95, LATENCY_BUCKETS_S, per_bucket))
        assert lat.mean_s == pytest.approx(value(got, f"{name}_sum") / 41)
    assert 1.5 < summary.latency["end_to_end"].p99_s <= 2.5  # the record 2 s old in Kafka
    assert (summary.layer_steps, summary.busy_slots, summary.consumer_lag) == (99, 1, {"in[1]": 4})
    assert summary.to_dict()["latency"]["queue"]["count"] == 41


def test_histogram_quantile_follows_promql() -> None:
    bounds = [1.0, 2.0, 4.0]
    assert histogram_quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert histogram_quantile(0.5, bounds, [2, 2, 0, 0]) == pytest.approx(1.0)  # rank 2 at top of bucket 1
    assert histogram_quantile(0.75, bounds, [2, 2, 0, 0]) == pytest.approx(1.5)
    assert histogram_quantile(0.25, bounds, [0, 0, 4, 0]) == pytest.approx(2.5)  # lower edge is 2
    assert histogram_quantile(0.1, bounds, [1, 0, 0, 0]) == pytest.approx(0.1)  # first bucket from 0
    assert histogram_quantile(0.99, bounds, [1, 0, 0, 9]) == 4.0  # +Inf bucket -> highest bound


def test_message_span_is_child_of_input_traceparent_and_output_continues_trace() -> None:
    spans = InMemorySpanExporter()
    settings = TelemetrySettings(trace_sample_ratio=0.0)  # parent-based: the sampled parent wins
    with Telemetry(settings, replica_id="r", num_layers=L, span_exporters=[spans]) as tel:
        headers = [*traceparent("01"), ("tracestate", b"vendor=abc")]
        out = tel.record_prediction(prediction(4, queue_s=0.25, compute_s=0.5), headers, attributes={"k": 1})
    (span,) = spans.get_finished_spans()
    assert span.name == "elbert.message"
    assert span.parent is not None and span.parent.is_remote
    assert (f"{span.parent.trace_id:032x}", f"{span.parent.span_id:016x}") == (TRACE_ID, PARENT_SPAN)
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.attributes is not None and span.attributes["elbert.exit_depth"] == 4
    assert span.attributes["k"] == 1
    assert (span.end_time - span.start_time) / 1e9 == pytest.approx(0.75, abs=1e-6)
    assert [e.name for e in span.events] == ["admitted", "exited"]
    assert (span.events[0].timestamp - span.start_time) / 1e9 == pytest.approx(0.25, abs=1e-6)
    out_headers = dict(out)
    assert out_headers["traceparent"].decode() == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"
    assert out_headers["tracestate"] == b"vendor=abc"
    assert "key" not in out_headers


def test_unsampled_roots_still_get_a_traceparent_and_dead_letters_are_errors() -> None:
    spans = InMemorySpanExporter()
    settings = TelemetrySettings(trace_sample_ratio=0.0)
    with Telemetry(settings, replica_id="r", num_layers=L, span_exporters=[spans]) as tel:
        root = dict(tel.record_prediction(prediction(2)))
        unsampled_parent = dict(tel.record_prediction(prediction(2), traceparent("00")))
        dead = dict(tel.record_dead_letter("not_json", traceparent("01")))

    def sampled(tp: bytes) -> bool:
        return bool(int(tp.decode().split("-")[3], 16) & 1)

    assert not sampled(root["traceparent"]) and not sampled(unsampled_parent["traceparent"])
    assert sampled(dead["traceparent"])
    assert TRACE_ID.encode() in unsampled_parent["traceparent"]
    (span,) = spans.get_finished_spans()  # only the dead letter, whose parent is sampled
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["elbert.reason"] == "not_json"
    assert dead["traceparent"].decode().split("-")[1:3] == [TRACE_ID, f"{span.context.span_id:016x}"]


def test_without_tracing_the_input_trace_context_passes_through() -> None:
    with Telemetry(TelemetrySettings(), replica_id="r", num_layers=L) as tel:
        assert not tel.tracing_enabled and tel.prometheus_port is None
        assert tel.record_prediction(prediction(1), traceparent()) == traceparent()[:1]
        assert tel.record_dead_letter("x", [("other", b"1")]) == []
        assert tel.summary().messages == {"ok": 1, "dead_letter": 1, "error": 0}


def test_reason_labels_are_capped() -> None:
    with Telemetry(TelemetrySettings(), replica_id="r", num_layers=L) as tel:
        for i in range(MAX_REASONS + 10):
            tel.record_dead_letter(f"reason{i}")
        reasons = tel.summary().reasons
    assert len(reasons) == MAX_REASONS + 1 and reasons["dead_letter/other"] == 10


def test_broken_stats_does_not_break_the_scrape() -> None:
    def broken() -> StatsSnapshot:
        raise RuntimeError("boom")

    with Telemetry(TelemetrySettings(**LOCAL), replica_id="r", num_layers=L) as tel:
        tel.set_stats(broken)
        tel.record_prediction(prediction(3))
        assert tel.prometheus_port is not None
        got = samples(scrape(tel.prometheus_port))
    assert value(got, "elbert_exit_depth_count") == 1
    assert not any(name == "elbert_busy_slots" for name, _ in got)


def test_shutdown_frees_the_port_and_lifecycle_is_explicit() -> None:
    tel = Telemetry(TelemetrySettings(**LOCAL), replica_id="r", num_layers=L)
    with pytest.raises(ElbertError, match="not started"):
        tel.record_prediction(prediction(1))
    tel.start()
    port = tel.prometheus_port
    assert port is not None
    taken = Telemetry(
        TelemetrySettings(prometheus_port=port, prometheus_host="127.0.0.1"), replica_id="b", num_layers=L
    )
    with pytest.raises(ConfigError, match=str(port)):
        taken.start()
    tel.shutdown()
    tel.shutdown()
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free again
    with pytest.raises(ConfigError, match="num_layers"):
        Telemetry(TelemetrySettings(), replica_id="r", num_layers=0)


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_otlp_exports_metrics_and_traces_to_the_configured_endpoint() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Collector.received = []
    settings = TelemetrySettings(
        otlp_endpoint=f"http://127.0.0.1:{server.server_port}/",
        otlp_headers=SecretStr("authorization=Bearer s3cr3t, x-tenant = t1"),
        otlp_export_interval_s=3600,
    )
    try:
        tel = Telemetry(settings, replica_id="r-otlp", num_layers=L).start()
        assert tel.tracing_enabled
        tel.record_prediction(prediction(5), traceparent())
        tel.shutdown()  # flushes both exporters
    finally:
        server.shutdown()
        server.server_close()
    by_path = {path: (headers, body) for path, headers, body in _Collector.received}
    assert set(by_path) == {"/v1/metrics", "/v1/traces"}
    for headers, body in by_path.values():
        assert headers["authorization"] == "Bearer s3cr3t" and headers["x-tenant"] == "t1"
        assert b"s3cr3t" not in body and b"r-otlp" in body
    assert b"elbert_exit_depth" in by_path["/v1/metrics"][1]
    assert bytes.fromhex(TRACE_ID) in by_path["/v1/traces"][1]


def test_bad_otlp_headers_are_rejected_without_echoing_the_secret() -> None:
    settings = TelemetrySettings(
        otlp_endpoint="http://127.0.0.1:9", otlp_headers=SecretStr("tokenonly-s3cr3t")
    )
    with pytest.raises(ConfigError, match="otlp_headers") as err:
        Telemetry(settings, replica_id="r", num_layers=L).start()
    assert "s3cr3t" not in str(err.value)
