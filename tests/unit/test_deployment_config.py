"""The replica's settings precedence and user_config validation (pure; no Ray cluster)."""

from __future__ import annotations

import pytest

from elbert_stream.config import Settings
from elbert_stream.errors import ConfigError
from elbert_stream.serve.overrides import (
    LIVE_SECTIONS,
    RESTART_SECTIONS,
    changed_sections,
    deep_merge,
    group_instance_id,
    merge_settings,
    parse_overrides,
)


def test_deep_merge_merges_nested_and_replaces_leaves() -> None:
    base = {"kafka": {"group_id": "g", "input_topics": ["a", "b"]}, "exit": {"tau": 0.1}}
    out = deep_merge(base, {"kafka": {"input_topics": ["c"]}, "exit": {"window": 2}})
    assert out == {"kafka": {"group_id": "g", "input_topics": ["c"]}, "exit": {"tau": 0.1, "window": 2}}
    assert base["kafka"]["input_topics"] == ["a", "b"]  # the base is not mutated


def test_user_config_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELBERT_EXIT__TAU", "0.3")
    monkeypatch.setenv("ELBERT_KAFKA__GROUP_ID", "from-env")
    s = merge_settings(Settings(), {"exit": {"tau": 0.05}}, {"exit": {"window": 4}})
    assert (s.exit.tau, s.exit.window, s.kafka.group_id) == (0.05, 4, "from-env")


def test_secrets_survive_a_merge() -> None:
    sasl = {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u",
            "sasl_password": "s3cret"}
    s = merge_settings(merge_settings(Settings(), {"kafka": sasl}), {"exit": {"tau": 0.2}})
    assert s.kafka.sasl_password is not None and s.kafka.sasl_password.get_secret_value() == "s3cret"


@pytest.mark.parametrize("bad, needle", [
    ({"exit": {"bogus": 1}}, "exit.bogus"),
    ({"exitt": {}}, "exitt"),
    ({"kafka": {"bootstrap": "x"}}, "kafka.bootstrap"),
    ({"exit": {"tau": 5}}, "tau"),
    ({"engine": {"max_slots": 0}}, "max_slots"),
])
def test_bad_user_config_names_the_key(bad: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        merge_settings(Settings(), bad)


def test_changed_sections_drive_live_versus_restart() -> None:
    base = Settings()
    assert changed_sections(base, merge_settings(base, {"exit": {"tau": 0.2}})) == {"exit"}
    both = changed_sections(base, merge_settings(base, {"exit": {"tau": 0.2}, "engine": {"max_slots": 8}}))
    assert both == {"exit", "engine"} and both & RESTART_SECTIONS == {"engine"}
    assert not LIVE_SECTIONS & RESTART_SECTIONS
    assert set(Settings.model_fields) == LIVE_SECTIONS | RESTART_SECTIONS


def test_membership_is_dynamic_unless_a_static_prefix_is_set() -> None:
    s = Settings()
    assert group_instance_id(s, 0) == ""  # the Worker's "dynamic membership" value
    s = merge_settings(s, {"kafka": {"group_instance_id": "prod"}})
    assert group_instance_id(s, 3) == "prod-r3" != group_instance_id(s, 4)


def test_parse_overrides_accepts_json_and_mappings() -> None:
    assert parse_overrides(None) == {} == parse_overrides("")
    assert parse_overrides('{"exit": {"tau": 0.2}}') == {"exit": {"tau": 0.2}}
    assert parse_overrides({"a": 1}) == {"a": 1}
    with pytest.raises(ConfigError, match="not JSON"):
        parse_overrides("{nope")
    with pytest.raises(ConfigError, match="JSON object"):
        parse_overrides("[1, 2]")
