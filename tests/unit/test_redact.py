"""The log redaction of secrets handed to kafka-python (elbert_stream.stream.redact)."""

from __future__ import annotations

import logging

import pytest

from elbert_stream.config import KafkaSettings
from elbert_stream.stream.client import client_config
from elbert_stream.stream.redact import MASK, register_secrets


def test_kafka_records_lose_registered_secrets_in_text_and_bytes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    register_secrets("pä$$-unit-1", None, "")
    auth = b"u\x00u\x00" + "pä$$-unit-1".encode()
    logging.getLogger("kafka.net.connection").debug("Request 3: %s", {"auth_bytes": auth})
    logging.getLogger("kafka.admin.client").debug("configuration: %s", {"sasl_plain_password": "pä$$-unit-1"})
    logging.getLogger("elsewhere").debug("not kafka: %s", "pä$$-unit-1")
    kafka_lines = [r.getMessage() for r in caplog.records if r.name.startswith("kafka")]
    assert len(kafka_lines) == 2 and all(MASK in m for m in kafka_lines), kafka_lines
    assert not any("p\\xc3\\xa4$$-unit-1" in m or "pä$$-unit-1" in m for m in kafka_lines)
    assert caplog.records[-1].getMessage() == "not kafka: pä$$-unit-1"  # only kafka-python's records


def test_client_config_registers_its_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    k = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u",
                      sasl_password="unit-sasl-secret-2", ssl_password="unit-key-secret-3")
    cfg = client_config(k)
    logging.getLogger("kafka.admin.client").debug("Starting KafkaAdminClient with configuration: %s", cfg)
    assert "unit-sasl-secret-2" not in caplog.text and "unit-key-secret-3" not in caplog.text
    assert caplog.text.count(MASK) == 2
