"""Secured clusters end to end: real TLS and SASL handshakes by the worker's own Kafka clients.

Tansu 0.6 has neither SASL nor a working TLS listener, so a loopback gateway (secure_gateway.py)
fronts it: it terminates TLS with a throwaway CA (optionally requiring a client certificate) and runs
the broker side of the SASL exchange (PLAIN, SCRAM-SHA-256/512), then relays to Tansu, which
advertises the gateway's port. The worker is configured only through ELBERT_KAFKA__* environment
variables (as the k8s manifests do) and must answer every input through the gateway; the gateway
records each handshake and authenticated user, so a client that went around security fails the test.
Wrong credentials, an untrusted CA and a missing client certificate must be refused, and no secret
may appear in the logs, in ``/stats`` or in a trace.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient
from kafka.errors import KafkaError
from kafka_support import by_source, produce, read_all, wait_for
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from secure_gateway import Pki, SecureGateway

from elbert_stream.config import Settings
from elbert_stream.engine.engine import Engine
from elbert_stream.stream.client import KafkaUnreachable, client_config
from elbert_stream.stream.worker import Worker
from elbert_stream.telemetry.metrics import Telemetry
from elbert_stream.testing.broker import EmbeddedBroker, create_topics

pytestmark = pytest.mark.integration
SASL_PASSWORD = "s3cr3t-sasl-password"
USERS = {"elbert-worker": SASL_PASSWORD}

# (security_protocol, sasl_mechanism, client certificate required by the gateway)
CASES = {
    "SSL-mutual": ("SSL", None, True),
    "SASL_SSL-PLAIN": ("SASL_SSL", "PLAIN", False),
    "SASL_SSL-SCRAM-SHA-512": ("SASL_SSL", "SCRAM-SHA-512", False),
    "SASL_PLAINTEXT-SCRAM-SHA-256": ("SASL_PLAINTEXT", "SCRAM-SHA-256", False),
}


class GatewayedTansu(EmbeddedBroker):
    """Tansu listening on its own port and advertising ``advertised_port`` (the gateway's)."""

    def __init__(self, advertised_port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.advertised_port = advertised_port

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--advertised-listener-url") + 1] = f"tcp://{self.host}:{self.advertised_port}"
        return cmd

    def _wait_ready(self) -> None:  # a plain client cannot go through the gateway: wait for the port
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"Tansu did not listen on {self.bootstrap}")


class Secured:
    """Tansu behind a SecureGateway for one security case; ``env`` configures a worker for it."""

    def __init__(self, case: str, pki: Pki, model_dir: Path, delivery: str = "at_least_once") -> None:
        protocol, mechanism, mutual = self.case = CASES[case]
        tls = pki.server_context(require_client_cert=mutual) if protocol.endswith("SSL") else None
        self.gateway = SecureGateway(("127.0.0.1", 0), tls=tls, users=USERS if mechanism else None)
        self.broker = GatewayedTansu(self.gateway.port)
        self.gateway.target = ("127.0.0.1", self.broker.port)
        self.broker.start()
        self.bootstrap = f"127.0.0.1:{self.gateway.port}"
        self.names = {"input": "in", "output": "out", "dead": "dlq", "group": "g"}
        self.env = {
            "ELBERT_MODEL__PATH": str(model_dir), "ELBERT_MODEL__DEVICE": "cpu",
            "ELBERT_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap, "ELBERT_KAFKA__INPUT_TOPICS": '["in"]',
            "ELBERT_KAFKA__OUTPUT_TOPIC": "out", "ELBERT_KAFKA__DEAD_LETTER_TOPIC": "dlq",
            "ELBERT_KAFKA__GROUP_ID": "g", "ELBERT_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "ELBERT_KAFKA__HEARTBEAT_INTERVAL_MS": "1000", "ELBERT_KAFKA__DELIVERY": delivery,
            "ELBERT_KAFKA__SECURITY_PROTOCOL": protocol, "ELBERT_ENGINE__MAX_SLOTS": "8",
            "ELBERT_TELEMETRY__TRACE_SAMPLE_RATIO": "1.0",
        }
        if mechanism:
            self.env.update({"ELBERT_KAFKA__SASL_MECHANISM": mechanism,
                             "ELBERT_KAFKA__SASL_USERNAME": "elbert-worker",
                             "ELBERT_KAFKA__SASL_PASSWORD": SASL_PASSWORD})
        if tls is not None:
            self.env["ELBERT_KAFKA__SSL_CAFILE"] = str(pki.ca)
        if mutual:
            self.env.update({"ELBERT_KAFKA__SSL_CERTFILE": str(pki.client_cert),
                             "ELBERT_KAFKA__SSL_KEYFILE": str(pki.client_key),
                             "ELBERT_KAFKA__SSL_PASSWORD": pki.key_password})

    def close(self) -> None:
        self.broker.stop()
        self.gateway.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def secured(request: pytest.FixtureRequest, pki: Pki, tiny_model_dir: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Secured]:
    case, delivery = request.param
    s = Secured(case, pki, tiny_model_dir, delivery)
    for key, value in s.env.items():
        monkeypatch.setenv(key, value)
    try:
        yield s
    finally:
        s.close()


def secrets_of(env: dict[str, str]) -> list[str]:
    return [v for k, v in env.items() if k.endswith("_PASSWORD")]


@pytest.mark.parametrize("secured", [(c, "at_least_once") for c in CASES] + [
    ("SASL_SSL-SCRAM-SHA-512", "exactly_once")], indirect=True, ids=lambda p: f"{p[0]}-{p[1]}")
def test_worker_answers_through_the_secured_listener(secured: Secured,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings()  # from the ELBERT_* environment only
    cfg = client_config(settings.kafka)
    cfg.pop("bootstrap_servers")
    create_topics(secured.bootstrap, ["in", "out", "dlq"], 2, **cfg)
    engine = Engine.from_settings(settings)
    spans = InMemorySpanExporter()
    telemetry = Telemetry(settings.telemetry, replica_id="secure", num_layers=engine.model.num_layers,
                          span_exporters=[spans])
    worker = Worker(settings, engine, None, replica_id="secure", telemetry=telemetry).start()
    try:
        texts = [f"secured story {i}: the market rallied".encode() for i in range(40)] + [b"\xff\xfe bad"]
        sent = produce(secured.bootstrap, "in", [(None, t, {}) for t in texts], **cfg)
        want = {r.position for r in sent}

        def answered() -> dict[Any, Any]:
            got = read_all(secured.bootstrap, ["out", "dlq"], len(want), timeout_s=5, settle_s=0.2,
                           isolation_level="read_committed", **cfg)
            return by_source({"out": got["out"], "dead": got["dlq"]})

        assert wait_for(lambda: want <= set(answered()), 90, interval_s=1.0), worker.stats()
        index = answered()
        kinds = sorted(kind for p in want for kind, _ in index[p])
        assert kinds == ["dead"] + ["out"] * 40, kinds  # the non-UTF-8 one is a dead letter
        assert all(len(index[p]) == 1 for p in want)
        stats = json.dumps(worker.stats(), default=str)
        assert worker.error is None, worker.error
    finally:
        worker.stop(10)
        telemetry.shutdown()
    traces = [span.to_json() for span in spans.get_finished_spans()]
    assert len(traces) >= 41, len(traces)  # one span per message, sampled (trace_sample_ratio 1.0)
    g = secured.gateway
    protocol, mechanism, mutual = secured.case
    if protocol.endswith("SSL"):
        assert g.tls_handshakes > 0
    if mutual:
        assert set(g.client_subjects) == {"elbert-worker"}, g.client_subjects
    if mechanism:
        assert g.authenticated and {u for _, u in g.authenticated} == {"elbert-worker"}
        assert {m for m, _ in g.authenticated} == {mechanism}
    assert not g.failures, g.failures
    for secret in secrets_of(secured.env):
        assert secret not in caplog.text, "a secret reached the logs"
        assert secret not in stats, "a secret reached /stats"
        assert not any(secret in t for t in traces), "a secret reached a trace"


def admin_error(bootstrap: str, **cfg: Any) -> BaseException | None:
    """The error a client with ``cfg`` gets listing topics through the gateway (None: it got through)."""
    try:
        admin = KafkaAdminClient(**{"bootstrap_servers": bootstrap, "request_timeout_ms": 5000,
                                    "reconnect_backoff_max_ms": 1000, **cfg, "bootstrap_timeout_ms": 6000})
        try:
            admin.list_topics()
        finally:
            admin.close()
    except (KafkaError, OSError) as e:
        return e
    return None


@pytest.mark.parametrize("secured", [("SASL_SSL-SCRAM-SHA-512", "at_least_once")], indirect=True,
                         ids=["scram"])
def test_wrong_credentials_are_refused(secured: Secured, pki: Pki, tmp_path: Path) -> None:
    ok = client_config(Settings().kafka)
    ok.pop("bootstrap_servers")
    assert admin_error(secured.bootstrap, **ok) is None
    wrong_password = {**ok, "sasl_plain_password": "not-the-password"}
    assert admin_error(secured.bootstrap, **wrong_password) is not None
    assert any("wrong password" in f for f in secured.gateway.failures), secured.gateway.failures
    other_ca = Pki(tmp_path / "other")
    assert admin_error(secured.bootstrap, **{**ok, "ssl_cafile": str(other_ca.ca)}) is not None
    plaintext = {k: v for k, v in ok.items() if not k.startswith("ssl_")}
    plaintext["security_protocol"] = "SASL_PLAINTEXT"
    assert admin_error(secured.bootstrap, **plaintext) is not None


@pytest.mark.parametrize("secured", [("SASL_SSL-SCRAM-SHA-512", "at_least_once")], indirect=True,
                         ids=["scram"])
def test_a_worker_with_a_wrong_password_fails_saying_why(secured: Secured, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("ELBERT_KAFKA__SASL_PASSWORD", "wrong-password-x")
    monkeypatch.setenv("ELBERT_KAFKA__BOOTSTRAP_TIMEOUT_MS", "5000")
    settings = Settings()
    worker = Worker(settings, Engine.from_settings(settings), None, replica_id="bad").start()
    try:
        assert wait_for(lambda: not worker.alive(), 30), "a worker that cannot authenticate must fail"
    finally:
        worker.stop(5)
    assert isinstance(worker.error, KafkaUnreachable), repr(worker.error)
    message = str(worker.error)
    assert "SaslAuthenticationFailedError" in message and "sasl_username=elbert-worker" in message, message
    assert "wrong-password-x" not in message + caplog.text


@pytest.mark.parametrize("secured", [("SSL-mutual", "at_least_once")], indirect=True, ids=["mtls"])
def test_mutual_tls_needs_the_client_certificate(secured: Secured) -> None:
    ok = client_config(Settings().kafka)
    ok.pop("bootstrap_servers")
    assert admin_error(secured.bootstrap, **ok) is None
    no_cert = {**ok, "ssl_certfile": None, "ssl_keyfile": None, "ssl_password": None}
    assert admin_error(secured.bootstrap, **no_cert) is not None
    assert any(f.startswith("TLS") for f in secured.gateway.failures), secured.gateway.failures
