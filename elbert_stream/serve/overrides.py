"""How a replica's settings are made: ``Settings()`` from the environment, then the bind-time overrides
and the deployment's ``user_config`` deep-merged on top, section by section, with unknown keys
refused. Pure functions, unit-tested without Ray.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from elbert_stream.config import Settings
from elbert_stream.errors import ConfigError

LIVE_SECTIONS = frozenset({"exit", "autoscaling", "adaptive"})  # applied without restarting the worker
RESTART_SECTIONS = frozenset({"model", "engine", "kafka", "telemetry"})  # worker restarted in place


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``; nested mappings merge, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_keys(model: type[BaseModel], override: Mapping[str, Any], where: str = "") -> None:
    """Reject keys that are not fields of ``model`` (nested sections checked too): a typo in a
    user_config must fail loudly, not be ignored."""
    for key, value in override.items():
        field = model.model_fields.get(key)
        if field is None:
            raise ConfigError(f"unknown setting '{where}{key}'; known: {sorted(model.model_fields)}")
        sub = field.annotation
        if isinstance(value, Mapping) and isinstance(sub, type) and issubclass(sub, BaseModel):
            check_keys(sub, value, f"{where}{key}.")


def merge_settings(base: Settings, *overrides: Mapping[str, Any] | None) -> Settings:
    """``base`` with each override applied in turn; unknown keys or bad values raise ConfigError."""
    doc: dict[str, Any] = base.model_dump()
    for override in overrides:
        if override is None:
            continue
        if not isinstance(override, Mapping):
            raise ConfigError(f"settings override must be a mapping, got {override!r}")
        check_keys(Settings, override)
        doc = deep_merge(doc, override)
    try:
        return Settings.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(f"invalid settings override: {e}") from e


def changed_sections(old: Settings, new: Settings) -> set[str]:
    """Top-level sections whose values differ."""
    a, b = old.model_dump(), new.model_dump()
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def group_instance_id(settings: Settings, rank: int) -> str:
    """The replica's member id for the worker: ``""`` (dynamic membership) unless
    ``kafka.group_instance_id`` names a prefix, then ``"{prefix}-r{rank}"`` (static)."""
    prefix = settings.kafka.group_instance_id
    return f"{prefix}-r{rank}" if prefix else ""


def rank_of(rank: Any) -> int | None:
    """The global rank from Serve's ``ReplicaRank`` (None when Serve gave none)."""
    value = getattr(rank, "rank", None)
    return int(value) if value is not None else None


def parse_overrides(value: Any) -> dict[str, Any]:
    """Builder / CLI argument: a mapping, a JSON object string, or None."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"settings override is not JSON: {value[:80]!r} ({e.msg})") from e
    if not isinstance(value, Mapping):
        raise ConfigError(f"settings override must be a JSON object, got {value!r}")
    return dict(value)
