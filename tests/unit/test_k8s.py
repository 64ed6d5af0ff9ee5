"""Offline validation of k8s/ (no cluster): real CRD schemas, strict; cross-file consistency.

The CRDs are read from ``$ELBERT_K8S_SCHEMAS`` or ``<repo>/../shared/k8s-schemas`` (upstream
CustomResourceDefinition YAMLs of KubeRay 1.7.0, Strimzi 0.51.0 and 1.2.0, Prometheus Operator
0.93.0). The validator lives in ``k8s/validate.py`` (also a CLI).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("k8s_validate", ROOT / "k8s" / "validate.py")
assert _spec is not None and _spec.loader is not None
kv = importlib.util.module_from_spec(_spec)
sys.modules["k8s_validate"] = kv  # dataclasses look their module up there
_spec.loader.exec_module(kv)

NO_CRD_IN_SHARED = {"KafkaUser"}  # Strimzi's 044-Crd-kafkauser.yaml is not in shared/k8s-schemas
OVERLAYS = {"base": ROOT / "k8s", "secure": ROOT / "k8s" / "secure"}
RENDERED = {name: kv.render(path) for name, path in OVERLAYS.items()}
PRODUCTION = yaml.load((ROOT / "deployments" / "production.yaml").read_text(), Loader=yaml.CSafeLoader)


@pytest.fixture(scope="session")
def schemas() -> Path:
    path = kv.schemas_dir()
    if not (path / "ray-project_kuberay-v1.7.0").is_dir():
        message = (
            f"CRD schemas not found at {path}: set ELBERT_K8S_SCHEMAS to a directory holding the upstream "
            "CRD YAMLs (layout in shared/k8s-schemas/README.md: KubeRay v1.7.0, Strimzi 0.51.0 and 1.2.0, "
            "prometheus-operator v0.93.0)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def find(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [d for d in RENDERED[overlay] if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(hits) == 1, f"{overlay}: expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def worker_spec(overlay: str) -> dict[str, Any]:
    (group,) = find(overlay, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def elbert_deployment(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = config["applications"]
    (dep,) = app["deployments"]
    return dep


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ------------------------------------------------------------------------------ schema validation


@pytest.mark.parametrize(
    "overlay,index",
    [(o, i) for o, docs in RENDERED.items() for i in range(len(docs))],
    ids=[f"{o}:{d['kind']}/{d['metadata']['name']}" for o, docs in RENDERED.items() for d in docs],
)
def test_document_validates(schemas: Path, overlay: str, index: int) -> None:
    doc = RENDERED[overlay][index]
    try:
        errors = kv.validate(doc, schemas)
    except KeyError as exc:
        if doc["kind"] in NO_CRD_IN_SHARED:
            pytest.skip(f"{kv.describe(doc)} not validated: {exc}; add Strimzi's 044-Crd-kafkauser.yaml")
        raise
    assert errors == [], "\n".join(errors)


def test_strimzi_documents_check_both_operator_versions(schemas: Path) -> None:
    for kind in ("Kafka", "KafkaNodePool", "KafkaTopic"):
        sources = [c.source for c in kv.crd_schemas("kafka.strimzi.io/v1", kind, schemas)]
        assert [s.split("/")[0].rsplit("-", 1)[1] for s in sources] == ["0.51.0", "1.2.0"], sources


def test_every_manifest_file_is_in_a_kustomization() -> None:
    listed = set()
    for directory in OVERLAYS.values():
        (kust,) = kv.load_docs(directory / "kustomization.yaml")
        listed |= {(directory / r).resolve() for r in kust["resources"] if (directory / r).is_file()}
    on_disk = {p.resolve() for p in (ROOT / "k8s").rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert on_disk == listed


# ------------------------------------------------------------------------------ negative checks


def _errors(schemas: Path, doc: dict[str, Any]) -> str:
    return "\n".join(kv.validate(doc, schemas))


def test_misspelt_fields_are_rejected(schemas: Path) -> None:
    rs = copy.deepcopy(find("base", "RayService"))
    rs["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    assert "'enableInTreeAutoscalling' was unexpected" in _errors(schemas, rs)
    topic = copy.deepcopy(find("base", "KafkaTopic", "elbert-input"))
    topic["spec"]["partition"] = 8
    assert _errors(schemas, topic).count("'partition' was unexpected") == 2  # both Strimzi versions
    topic["metadata"]["lables"] = {}
    assert "'lables' was unexpected" in _errors(schemas, topic)
    cm = copy.deepcopy(find("base", "ConfigMap"))
    cm["datas"] = cm.pop("data")
    assert "'datas' was unexpected" in _errors(schemas, cm)


def test_wrong_types_missing_fields_and_enums_are_rejected(schemas: Path) -> None:
    rs = copy.deepcopy(find("base", "RayService"))
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    worker["maxReplicas"] = "eight"
    del worker["groupName"]
    errors = _errors(schemas, rs)
    assert "'eight' is not of type 'integer'" in errors and "'groupName' is a required property" in errors
    kafka = copy.deepcopy(find("base", "Kafka"))
    kafka["spec"]["kafka"]["listeners"][0]["type"] = "internall"
    assert "'internall' is not one of" in _errors(schemas, kafka)


def test_cel_rules_are_evaluated(schemas: Path) -> None:
    rs = copy.deepcopy(find("base", "RayService"))
    rs["spec"]["managedBy"] = "someone-else"
    assert "managedBy field value must be either" in _errors(schemas, rs)
    rs["spec"]["managedBy"] = "ray.io/kuberay-operator"
    assert _errors(schemas, rs) == ""
    kafka = copy.deepcopy(find("base", "Kafka"))
    kafka["spec"]["kafka"]["metricsConfig"] = {"type": "jmxPrometheusExporter"}
    assert _errors(schemas, kafka).count("valueFrom property is required") == 2


def test_v1beta2_strimzi_is_refused_by_strimzi_1x(schemas: Path) -> None:
    kafka = copy.deepcopy(find("base", "Kafka"))
    kafka["apiVersion"] = "kafka.strimzi.io/v1beta2"
    with pytest.raises(KeyError, match="1.2.0"):
        kv.validate(kafka, schemas)


# ------------------------------------------------------------------------------ serve config


def test_serve_config_v2_is_deployments_production() -> None:
    embedded = find("base", "RayService")["spec"]["serveConfigV2"]
    assert yaml.safe_load(embedded) == PRODUCTION, "run: python k8s/sync_serve_config.py"
    sync = importlib.util.spec_from_file_location("sync_serve_config", ROOT / "k8s" / "sync_serve_config.py")
    assert sync is not None and sync.loader is not None
    module = importlib.util.module_from_spec(sync)
    sync.loader.exec_module(module)
    assert module.main(["--check"]) == 0


def test_serve_config_v2_parses_with_ray() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(find("base", "RayService")["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    assert schema.applications[0].import_path == "elbert_stream.serve.deployment:app"


def test_serve_config_import_path_imports() -> None:
    module_name, _, attr = PRODUCTION["applications"][0]["import_path"].partition(":")
    if importlib.util.find_spec(module_name) is None:
        pytest.xfail(f"{module_name} does not exist yet (written by the Serve deployment task)")
    assert getattr(importlib.import_module(module_name), attr) is not None


def test_rayservice_matches_serve_config_and_topics() -> None:
    import ray

    dep = elbert_deployment(PRODUCTION)
    auto, kafka_cfg = dep["autoscaling_config"], dep["user_config"]["kafka"]
    rs = find("base", "RayService")
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    worker = worker_spec("base")
    (container,) = worker["template"]["spec"]["containers"]
    assert worker["maxReplicas"] == auto["max_replicas"]  # one replica per GPU pod
    assert worker["minReplicas"] >= auto["min_replicas"] * dep["ray_actor_options"]["num_gpus"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == dep["ray_actor_options"]["num_gpus"]
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] > dep["graceful_shutdown_timeout_s"]
    input_topic = find("base", "KafkaTopic", kafka_cfg["input_topics"][0])
    assert input_topic["spec"]["partitions"] == auto["max_replicas"]
    for topic in (kafka_cfg["output_topic"], kafka_cfg["dead_letter_topic"]):
        find("base", "KafkaTopic", topic)


def test_kafka_wiring() -> None:
    kafka = find("base", "Kafka")
    name = kafka["metadata"]["name"]
    for kind in ("KafkaNodePool", "KafkaTopic"):
        for doc in (d for d in RENDERED["base"] if d["kind"] == kind):
            assert doc["metadata"]["labels"]["strimzi.io/cluster"] == name, kv.describe(doc)
    ports = {listener["port"]: listener for listener in kafka["spec"]["kafka"]["listeners"]}
    env = env_of(worker_spec("base")["template"]["spec"]["containers"][0])
    host, _, port = env["ELBERT_KAFKA__BOOTSTRAP_SERVERS"].partition(":")
    assert host == f"{name}-kafka-bootstrap" and "authentication" not in ports[int(port)]


def test_secure_overlay_wires_scram_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from elbert_stream.config import Settings

    kafka = find("secure", "Kafka")
    listeners = kafka["spec"]["kafka"]["listeners"]
    assert listeners and all(lst["tls"] for lst in listeners)
    assert all(lst["authentication"]["type"] == "scram-sha-512" for lst in listeners)
    assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"
    pod = worker_spec("secure")["template"]["spec"]
    env = env_of(pod["containers"][0])
    user = find("secure", "KafkaUser", env["ELBERT_KAFKA__SASL_USERNAME"])
    secret_ref = {"secretKeyRef": {"name": user["metadata"]["name"], "key": "password"}}
    assert env["ELBERT_KAFKA__SASL_PASSWORD"] == secret_ref
    assert int(env["ELBERT_KAFKA__BOOTSTRAP_SERVERS"].rpartition(":")[2]) == listeners[0]["port"]
    (volume,) = pod["volumes"]
    assert volume["secret"]["secretName"] == f"{kafka['metadata']['name']}-cluster-ca-cert"
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    assert env["ELBERT_KAFKA__SSL_CAFILE"] == f"{mount}/ca.crt"
    for key, value in env.items():  # the env names are real settings, and they validate together
        monkeypatch.setenv(key, value if isinstance(value, str) else "from-the-secret")
    settings = Settings()
    assert settings.kafka.security_protocol == "SASL_SSL" and settings.kafka.sasl_password is not None
    kafka_cfg = elbert_deployment(PRODUCTION)["user_config"]["kafka"]
    acls = {(a["resource"]["type"], a["resource"]["name"]): set(a["operations"])
            for a in user["spec"]["authorization"]["acls"]}  # fmt: skip
    assert {"Read"} <= acls[("topic", kafka_cfg["input_topics"][0])]
    for topic in (kafka_cfg["output_topic"], kafka_cfg["dead_letter_topic"]):
        assert {"Write"} <= acls[("topic", topic)]
    assert kafka_cfg["group_id"].startswith(next(n for t, n in acls if t == "group"))


# ------------------------------------------------------------------------------ monitoring


def test_pod_monitor_selects_the_pods_and_ports() -> None:
    monitor = find("base", "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    worker = worker_spec("base")["template"]
    assert selector.items() <= worker["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in worker["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= set(ports)
    telemetry = elbert_deployment(PRODUCTION)["user_config"]["telemetry"]
    assert ports["elbert-metrics"] == telemetry["prometheus_port"]


def test_dashboard_shows_the_load_and_uses_real_metric_names() -> None:
    cm = find("base", "ConfigMap", "elbert-stream-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["elbert-stream.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\belbert_\w+", e)}
    for needed in ("elbert_exit_depth", "elbert_layer_steps_total", "elbert_pending_layer_work",
                   "elbert_consumer_lag", "elbert_busy_slots"):  # fmt: skip
        assert needed in used
    assert any("replicas" in e for e in exprs)
    sources = sorted((ROOT / "elbert_stream" / "telemetry").glob("*.py"))
    defined = {m for src in sources for m in re.findall(r'"(elbert_\w+)"', src.read_text())}
    assert used <= defined, f"dashboard uses metrics the telemetry modules do not define: {used - defined}"
