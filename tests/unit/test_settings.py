"""Settings: every one documented once (docs/settings.md is generated from config.py), env overrides."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from elbert_stream.config import Settings
from tools import settings_doc

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_every_setting_has_a_description() -> None:
    missing = [f"{section}.{name}" for section, sfield in Settings.model_fields.items()
               for name, field in sfield.annotation.model_fields.items() if not field.description]
    assert missing == []


def test_settings_doc_is_generated_from_the_code() -> None:
    assert DOC.read_text() == settings_doc.render(), (
        "docs/settings.md is stale: python -m tools.settings_doc > docs/settings.md")


def test_nested_environment_variables_override_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELBERT_KAFKA__BOOTSTRAP_SERVERS", "broker-0:9093")
    monkeypatch.setenv("ELBERT_KAFKA__INPUT_TOPICS", '["a", "b"]')
    monkeypatch.setenv("ELBERT_EXIT__TAU", "0.25")
    monkeypatch.setenv("ELBERT_ENGINE__MODE", "compaction")
    s = Settings()
    assert s.kafka.bootstrap_servers == "broker-0:9093"
    assert s.kafka.input_topics == ["a", "b"]
    assert s.exit.tau == 0.25
    assert s.engine.mode == "compaction"


def test_bad_values_are_rejected_with_the_value_quoted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELBERT_EXIT__TAU", "1.5")
    with pytest.raises(ValidationError, match="1.5"):
        Settings()


def test_sasl_without_credentials_is_rejected() -> None:
    with pytest.raises(ValidationError, match="SASL_SSL"):
        Settings(kafka={"security_protocol": "SASL_SSL"})


def test_secrets_are_not_in_repr_or_dump() -> None:
    s = Settings(kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                        "sasl_username": "u", "sasl_password": "hunter2-secret"})
    assert "hunter2-secret" not in repr(s)
    assert "hunter2-secret" not in s.model_dump_json()
