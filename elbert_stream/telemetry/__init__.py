"""Telemetry of one replica: OpenTelemetry metrics and the ``Telemetry`` object (``metrics.py``), where
they go (``exporters.py``: Prometheus, OTLP, trace context in Kafka headers), and the OpenTelemetry-free
summary, snapshot and histogram helpers (``summary.py``; the stream worker builds its snapshot with it)."""
