"""Secured clusters: the kafka-python configuration built from settings / ELBERT_* environment for the
source, the sink and the transactional sink (SASL PLAIN / SCRAM, TLS), and secrets that never show
in repr, dumps, logs or Worker.stats(). No broker: the client classes are replaced by recorders of
their keyword arguments (Tansu 0.6 has no SASL and no usable TLS listener; docs/streaming.md)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import ValidationError

from elbert_stream.config import KafkaSettings, Settings
from elbert_stream.stream import sink, source
from elbert_stream.stream.client import client_config
from elbert_stream.stream.offsets import OffsetTracker
from elbert_stream.stream.sink import KafkaSink
from elbert_stream.stream.source import KafkaSource
from elbert_stream.stream.transactions import TransactionalSink

SASL_PW, SSL_PW, OTLP = "s3cr3t-sasl-pw", "s3cr3t-key-pw", "authorization=Bearer s3cr3t-otlp"
SECRETS = (SASL_PW, SSL_PW, "s3cr3t-otlp")
SECURE_ENV = {
    "ELBERT_KAFKA__BOOTSTRAP_SERVERS": "b1:9093,b2:9093",
    "ELBERT_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
    "ELBERT_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
    "ELBERT_KAFKA__SASL_USERNAME": "elbert",
    "ELBERT_KAFKA__SASL_PASSWORD": SASL_PW,
    "ELBERT_KAFKA__SSL_CAFILE": "/etc/kafka/ca.pem",
    "ELBERT_KAFKA__SSL_CERTFILE": "/etc/kafka/client.pem",
    "ELBERT_KAFKA__SSL_KEYFILE": "/etc/kafka/client.key",
    "ELBERT_KAFKA__SSL_PASSWORD": SSL_PW,
    "ELBERT_KAFKA__SSL_CHECK_HOSTNAME": "false",
    "ELBERT_KAFKA__BOOTSTRAP_TIMEOUT_MS": "7000",
    "ELBERT_TELEMETRY__OTLP_HEADERS": OTLP,
}
WANT_SECURE = {
    "bootstrap_servers": ["b1:9093", "b2:9093"], "bootstrap_timeout_ms": 7000,
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "elbert", "sasl_plain_password": SASL_PW,
    "ssl_cafile": "/etc/kafka/ca.pem", "ssl_certfile": "/etc/kafka/client.pem",
    "ssl_keyfile": "/etc/kafka/client.key", "ssl_password": SSL_PW, "ssl_check_hostname": False,
}


class Recorder:
    """Stands in for KafkaConsumer / KafkaProducer: records the keyword arguments it was built with."""

    built: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, *topics: str, **kwargs: Any) -> None:
        self.config = {"max_request_size": 1_048_576, **kwargs}
        Recorder.built.append((type(self).__name__, kwargs))

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None  # subscribe, init_transactions, close, ...


class Consumer(Recorder):
    pass


class Producer(Recorder):
    pass


@pytest.fixture
def secure_env(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for k, v in SECURE_ENV.items():
        monkeypatch.setenv(k, v)
    return Settings()


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    Recorder.built = []
    monkeypatch.setattr(source, "KafkaConsumer", Consumer)
    monkeypatch.setattr(sink, "KafkaProducer", Producer)
    monkeypatch.setattr(sink, "no_busy_send_loop", lambda producer: None)  # a fake has no sender
    return Recorder.built


def test_env_settings_reach_source_sink_and_transactional_sink(secure_env: Settings,
                                                               recorded: list[Any]) -> None:
    k = secure_env.kafka
    assert client_config(k) == WANT_SECURE
    KafkaSource(k, OffsetTracker())
    KafkaSink(k, OffsetTracker(), replica_id="r")
    TransactionalSink(k, OffsetTracker(), replica_id="r", transactional_id="elbert-stream-g-r0")
    assert [name for name, _ in recorded] == ["Consumer", "Producer", "Producer"]
    for _, kwargs in recorded:
        assert {key: kwargs.get(key) for key in WANT_SECURE} == WANT_SECURE
    assert recorded[1][1]["enable_idempotence"] is False  # at_least_once: see sink.py
    assert recorded[2][1]["transactional_id"] == "elbert-stream-g-r0"
    assert recorded[2][1]["enable_idempotence"] is True
    assert recorded[2][1]["transaction_timeout_ms"] == k.transaction_timeout_ms


@pytest.mark.parametrize(("protocol", "mechanism", "want_sasl", "want_ssl"), [
    ("PLAINTEXT", None, False, False),
    ("SSL", None, False, True),
    ("SASL_PLAINTEXT", "PLAIN", True, False),
    ("SASL_PLAINTEXT", "SCRAM-SHA-256", True, False),
    ("SASL_SSL", "PLAIN", True, True),
])
def test_each_protocol_passes_only_its_options(protocol: str, mechanism: str | None, want_sasl: bool,
                                               want_ssl: bool) -> None:
    sasl = {"sasl_mechanism": mechanism, "sasl_username": "u", "sasl_password": "p"} if mechanism else {}
    k = KafkaSettings(security_protocol=protocol, ssl_cafile="/ca.pem", **sasl)  # type: ignore[arg-type]
    cfg = client_config(k)
    assert cfg["security_protocol"] == protocol
    assert ("sasl_mechanism" in cfg) == want_sasl and ("ssl_cafile" in cfg) == want_ssl
    if want_sasl:
        assert (cfg["sasl_mechanism"], cfg["sasl_plain_username"], cfg["sasl_plain_password"]) == (
            mechanism, "u", "p")
    if want_ssl:
        assert cfg["ssl_cafile"] == "/ca.pem" and cfg["ssl_check_hostname"] is True


def test_sasl_without_credentials_is_refused() -> None:
    with pytest.raises(ValidationError, match="needs sasl_mechanism"):
        KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u")


def test_secrets_never_in_repr_dumps_logs_or_stats(secure_env: Settings, recorded: list[Any],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from tiny_elbert import tiny_model

    from elbert_stream.config import EngineSettings
    from elbert_stream.engine.engine import Engine
    from elbert_stream.engine.policy import ExitPolicy
    from elbert_stream.stream.worker import Worker

    caplog.set_level(logging.DEBUG)
    texts = [repr(secure_env), str(secure_env), secure_env.model_dump_json(), str(secure_env.model_dump()),
             repr(secure_env.kafka)]
    model = tiny_model()
    engine = Engine(model, ExitPolicy.of("none", model.num_layers), EngineSettings(max_slots=4),
                    max_length=32)
    worker = Worker(secure_env, engine, None, replica_id="r")
    worker._open()  # builds source and sink from the settings, logs what it joins
    texts += [str(worker.stats()), caplog.text, repr(worker.settings)]
    leaked = [s for s in SECRETS for t in texts if s in t]
    assert not leaked, leaked
    assert secure_env.kafka.sasl_password is not None
    assert secure_env.kafka.sasl_password.get_secret_value() == SASL_PW  # still usable where needed
