"""The embedded-broker registry (testing/broker.py): choosing a broker by name, its quirks and the
settings its quirks need. Starting brokers is the integration tests' job."""

from __future__ import annotations

import pytest

from elbert_stream.config import Settings
from elbert_stream.testing import broker as b


def test_every_broker_names_only_known_quirks_and_valid_settings() -> None:
    for kind, cls in b.BROKERS.items():
        assert cls.kind == kind
        assert cls.quirks <= set(b.QUIRKS), cls.quirks - set(b.QUIRKS)
        Settings.model_validate(cls.product_settings)  # overrides a worker can take
    assert set().union(*(cls.quirks for cls in b.BROKERS.values())) == set(b.QUIRKS), "a quirk no broker has"


def test_tansu_reads_lag_from_the_high_watermark_and_noida_from_list_offsets() -> None:
    def lag_from(kind: str) -> str:
        return Settings.model_validate(b.BROKERS[kind].product_settings).kafka.lag_from

    assert lag_from("tansu") == "fetch_high_watermark"  # quirk list_offsets_wrong
    assert lag_from("noida") == "list_offsets" == Settings().kafka.lag_from


def test_broker_kind_default_env_and_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELBERT_EMBEDDED_BROKER", raising=False)
    assert b.broker_kind() == b.DEFAULT_BROKER
    monkeypatch.setenv("ELBERT_EMBEDDED_BROKER", "Noida")
    assert b.broker_kind() == "noida" and isinstance(b.embedded_broker(), b.NoidaBroker)
    assert b.broker_kind("tansu") == "tansu"
    with pytest.raises(b.BrokerError, match="choose one of"):
        b.broker_kind("redpanda")


def test_an_address_no_embedded_broker_runs_at_has_no_quirks() -> None:
    assert b.quirks_of("kafka.example:9092") == frozenset()
    assert b.product_settings_for("kafka.example:9092") == {}
    assert b.broker_name("kafka.example:9092") == "external kafka.example:9092"
