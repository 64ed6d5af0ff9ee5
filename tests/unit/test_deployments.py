"""deployments/*.yaml: valid Serve configs (Ray's own schema) whose settings the replica accepts."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from elbert_stream.serve.autoscaling import ExitDepthPolicy

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {name: ROOT / "deployments" / f"{name}.yaml" for name in ("production", "local")}


def load(name: str) -> dict[str, Any]:
    return yaml.load(CONFIGS[name].read_text(), Loader=yaml.CSafeLoader)


def worker_deployment(doc: dict[str, Any]) -> dict[str, Any]:
    (app,) = doc["applications"]
    assert app["import_path"] == "elbert_stream.serve.deployment:app"
    (dep,) = app["deployments"]
    assert dep["name"] == "ElbertWorker"
    return dep


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models inside an annotation (Optional/Union/List unwrapped)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, typing.List):  # noqa: UP006
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def unknown_keys(model: type[BaseModel], value: Any, path: str = "") -> list[str]:
    """Keys Ray's schemas would silently drop (they allow extra fields): typos that must fail.
    Free-form dicts (user_config, policy_kwargs, runtime_env) are not descended into."""
    if isinstance(value, list):
        base = path.removesuffix(".")
        return [k for i, item in enumerate(value) for k in unknown_keys(model, item, f"{base}[{i}].")]
    if not isinstance(value, dict):
        return []
    fields = model.model_fields
    aliases = {f.alias: name for name, f in fields.items() if f.alias}
    found = []
    for key, sub in value.items():
        name = key if key in fields else aliases.get(key)
        if name is None:
            found.append(f"{path}{key}")
            continue
        for sub_model in _models_in(fields[name].annotation)[:1]:
            found += unknown_keys(sub_model, sub, f"{path}{key}.")
    return found


def check_serve_config(doc: dict[str, Any]) -> ServeDeploySchema:
    """Ray's schema, plus no unknown keys anywhere (the autoscaling dict included)."""
    schema = ServeDeploySchema.model_validate(doc)
    bad = unknown_keys(ServeDeploySchema, doc)
    for app in doc["applications"]:
        for dep in app["deployments"]:
            if "autoscaling_config" in dep:
                AutoscalingConfig(**dep["autoscaling_config"])
                bad += unknown_keys(AutoscalingConfig, dep["autoscaling_config"], "autoscaling_config.")
    if bad:
        raise ValueError(f"unknown serve config keys: {bad}")
    return schema


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_serve_schema_accepts(name: str) -> None:
    schema = check_serve_config(load(name))
    assert [a.name for a in schema.applications] == ["elbert"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_user_config_is_valid_settings(name: str) -> None:
    """The replica deep-merges user_config on env settings and rejects unknown keys."""
    from elbert_stream.config import Settings
    from elbert_stream.serve.deployment import merge_settings

    settings = merge_settings(Settings(), worker_deployment(load(name))["user_config"])
    assert settings.kafka.input_topics == ["elbert-input"]
    assert settings.telemetry.prometheus_port == 9464


def test_production_autoscaling_uses_the_exit_depth_policy() -> None:
    dep = worker_deployment(load("production"))
    config = AutoscalingConfig(**dep["autoscaling_config"])  # imports the policy, as Serve does
    assert config.policy.policy_function == "elbert_stream.serve.autoscaling:ExitDepthPolicy"
    policy = ExitDepthPolicy(**config.policy.policy_kwargs)  # what Serve instantiates
    assert 0 < policy.settings.target_utilization <= 1
    assert config.upscale_delay_s == 0 and config.downscale_delay_s == 0  # our hysteresis only
    # reports reach the controller every metrics_interval_s (Ray's default 10 s would leave a
    # burst unseen for up to 10 s, and Ray warns when the look-back is not longer than it)
    assert "metrics_interval_s" in dep["autoscaling_config"]
    assert config.metrics_interval_s <= config.look_back_period_s / 2
    assert 1 <= config.min_replicas < config.max_replicas
    assert dep["ray_actor_options"]["num_gpus"] == 1
    assert "bootstrap_servers" not in dep["user_config"]["kafka"]  # comes from the pod env
    assert dep["graceful_shutdown_timeout_s"] > 0 and dep["health_check_period_s"] > 0


def test_local_is_one_cpu_replica_on_loopback() -> None:
    doc = load("local")
    dep = worker_deployment(doc)
    assert doc["http_options"]["host"] == "127.0.0.1"
    assert dep["num_replicas"] == 1 and "autoscaling_config" not in dep
    assert dep["ray_actor_options"]["num_gpus"] == 0
    assert dep["user_config"]["model"]["device"] == "cpu"
    assert dep["user_config"]["kafka"]["bootstrap_servers"].startswith("127.0.0.1:")
    assert dep["user_config"]["telemetry"]["prometheus_host"] == "127.0.0.1"


def test_misspelt_fields_are_rejected() -> None:
    """Ray itself ignores unknown keys (its models allow extras): check_serve_config must not."""
    doc = load("production")
    dep = worker_deployment(doc)
    dep["autoscaling_config"]["max_replica"] = dep["autoscaling_config"].pop("max_replicas")
    with pytest.raises(ValueError, match="autoscaling_config.max_replica"):
        check_serve_config(doc)
    doc = load("production")
    worker_deployment(doc)["graceful_shutdown_timeout"] = 5
    with pytest.raises(ValueError, match=r"applications\[0\]\.deployments\[0\]\.graceful_shutdown_timeout"):
        check_serve_config(doc)
    doc = load("production")
    worker_deployment(doc)["ray_actor_options"]["num_gpu"] = 1
    with pytest.raises(ValueError, match="ray_actor_options.num_gpu"):
        check_serve_config(doc)


def test_wrong_types_are_rejected() -> None:
    doc = load("production")
    worker_deployment(doc)["health_check_period_s"] = "often"
    with pytest.raises(Exception, match="health_check_period_s"):
        check_serve_config(doc)
    doc = load("production")
    worker_deployment(doc)["autoscaling_config"]["max_replicas"] = "eight"
    with pytest.raises(Exception, match="max_replicas"):
        check_serve_config(doc)
