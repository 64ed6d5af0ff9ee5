"""Offline validation of the manifests in k8s/ (no cluster, no kubectl, no kustomize binary).

``python k8s/validate.py [SCHEMAS_DIR]`` renders ``k8s/`` and ``k8s/secure/`` and checks every
document; exit status 1 on any error. ``tests/unit/test_k8s.py`` runs the same checks.

* Custom resources: against the upstream CRDs (``SCHEMAS_DIR``, default ``$ELBERT_K8S_SCHEMAS``
  or ``<repo>/../shared/k8s-schemas``), as the API server would on create: the served version's
  openAPIV3Schema made strict (unknown fields rejected wherever the schema lists properties and
  does not say x-kubernetes-preserve-unknown-fields), nullable / int-or-string honoured, defaults
  applied, then the CEL rules (x-kubernetes-validations) evaluated with cel-python. Transition
  rules (those using ``oldSelf``) only run on update and are skipped. A group listed with two
  CRD directories (Strimzi 0.51.0 and 1.2.0) must validate against both.
* ``metadata`` and built-in kinds: kubernetes-validate in strict mode (Kubernetes ``K8S_VERSION``).
* Kustomize: a small renderer for the features these kustomizations use (resources, namespace,
  images, configMapGenerator, JSON6902 patches); anything else is refused, never ignored.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"
CRD_DIRS = {  # group -> directories under the schemas dir; every one must accept the document
    "ray.io": ["ray-project_kuberay-v1.7.0"],
    "kafka.strimzi.io": ["strimzi_strimzi-kafka-operator-0.51.0", "strimzi_strimzi-kafka-operator-1.2.0"],
    "monitoring.coreos.com": ["prometheus-operator_prometheus-operator-v0.93.0"],
    "keda.sh": ["kedacore_keda-v2.20.2"],
}
KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "configMapGenerator", "patches"}


def schemas_dir() -> Path:
    return Path(os.environ.get("ELBERT_K8S_SCHEMAS") or ROOT.parent / "shared" / "k8s-schemas")


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.load_all(f, Loader=yaml.CSafeLoader) if d is not None]


# ------------------------------------------------------------------------------ kustomize (subset)


def render(directory: Path) -> list[dict[str, Any]]:
    """The documents ``kubectl apply -k directory`` would apply (for the supported subset)."""
    (kust,) = load_docs(directory / "kustomization.yaml")
    unsupported = set(kust) - KUSTOMIZE_KEYS
    if unsupported:
        raise ValueError(f"{directory}/kustomization.yaml: unsupported keys {sorted(unsupported)}")
    docs: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        docs += render(path) if path.is_dir() else load_docs(path)
    for gen in kust.get("configMapGenerator", []):
        docs.append(_config_map(directory, gen))
    for patch in kust.get("patches", []):
        _apply_patch(docs, patch)
    for doc in docs:
        _set_images(doc, kust.get("images", []))
        if kust.get("namespace") and doc["kind"] != "Namespace":
            doc.setdefault("metadata", {})["namespace"] = kust["namespace"]
    return docs


def _config_map(directory: Path, gen: dict[str, Any]) -> dict[str, Any]:
    options = gen.get("options", {})
    if set(gen) - {"name", "files", "options"} or set(options) - {"disableNameSuffixHash", "labels"}:
        raise ValueError(f"unsupported configMapGenerator entry {gen!r}")
    if not options.get("disableNameSuffixHash"):
        raise ValueError(f"configMapGenerator {gen['name']!r}: name hashing is not reproduced here")
    data = {Path(f).name: (directory / f).read_text() for f in gen.get("files", [])}
    meta: dict[str, Any] = {"name": gen["name"], "labels": dict(options.get("labels", {}))}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _apply_patch(docs: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    target, ops = patch["target"], yaml.safe_load(patch["patch"])
    hits = [
        d for d in docs
        if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        and d["apiVersion"].split("/")[0] == target.get("group", d["apiVersion"].split("/")[0])
    ]  # fmt: skip
    if len(hits) != 1:
        raise ValueError(f"patch target {target!r} matched {len(hits)} documents")
    for op in ops:
        _json_patch(hits[0], op)


def _json_patch(doc: Any, op: dict[str, Any]) -> None:
    """RFC 6902 add / replace / remove."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op["op"] == "remove":
        del node[int(last) if isinstance(node, list) else last]
    elif op["op"] in ("add", "replace") and isinstance(node, list):
        if op["op"] == "add":
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
        else:
            node[int(last)] = copy.deepcopy(op["value"])
    elif op["op"] == "add" or (op["op"] == "replace" and last in node):
        node[last] = copy.deepcopy(op["value"])
    else:
        raise ValueError(f"unsupported or failing JSON patch op {op!r}")


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    """kustomize's images transformer: any ``image`` under a ``containers``/``initContainers`` list."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    for image in images:
                        if container.get("image", "").split(":")[0] == image["name"]:
                            container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


# ------------------------------------------------------------------------------ CRD schemas


@dataclass
class CrdSchema:
    source: str  # "<dir>/<file>@<version>"
    schema: dict[str, Any]  # strict JSON schema
    raw: dict[str, Any]  # the openAPIV3Schema (for defaults and CEL)
    validator: Any = field(default=None, repr=False)


@cache
def _crd_index(base: str) -> dict[tuple[str, str, str], list[tuple[str, dict[str, Any]]]]:
    """(group, kind, version) -> [(source, openAPIV3Schema)] over the CRD_DIRS of ``base``."""
    index: dict[tuple[str, str, str], list[tuple[str, dict[str, Any]]]] = {}
    for group, dirs in CRD_DIRS.items():
        for sub in dirs:
            for path in sorted((Path(base) / sub).glob("*.yaml")):
                for crd in load_docs(path):
                    if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["group"] != group:
                        continue
                    for version in crd["spec"]["versions"]:
                        if version.get("served"):
                            key = (group, crd["spec"]["names"]["kind"], version["name"])
                            source = f"{sub}/{path.name}@{version['name']}"
                            index.setdefault(key, []).append((source, version["schema"]["openAPIV3Schema"]))
    return index


def crd_schemas(api_version: str, kind: str, base: Path | None = None) -> list[CrdSchema]:
    """One strict schema per CRD directory of the group; raises KeyError naming the gap."""
    group, _, version = api_version.rpartition("/")
    if group not in CRD_DIRS:
        raise KeyError(f"no CRD directory configured for group {group!r}")
    found = _crd_index(str(base or schemas_dir())).get((group, kind, version), [])
    dirs = {source.split("/")[0] for source, _ in found}
    missing = [d for d in CRD_DIRS[group] if d not in dirs]
    if missing:
        raise KeyError(f"{api_version} {kind}: no served CRD version in {missing}")
    return [_compiled(source, id(raw), raw) for source, raw in found]


_COMPILED: dict[tuple[str, int], CrdSchema] = {}


def _compiled(source: str, key: int, raw: dict[str, Any]) -> CrdSchema:
    from jsonschema import Draft7Validator

    if (source, key) not in _COMPILED:
        strict = strictify(raw)
        _COMPILED[(source, key)] = CrdSchema(source, strict, raw, Draft7Validator(strict))
    return _COMPILED[(source, key)]


def strictify(node: dict[str, Any]) -> dict[str, Any]:
    """Structural-schema -> JSON schema that rejects unknown fields like the API server prunes them."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in node:
        out["properties"] = {k: strictify(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strictify(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        out["items"] = strictify(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [strictify(s) for s in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    return out


def apply_defaults(schema: dict[str, Any], value: Any) -> None:
    """Fill ``default`` values in place, as the API server does before CEL runs."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(sub, value[name])
        if isinstance(schema.get("additionalProperties"), dict):
            for item in value.values():
                apply_defaults(schema["additionalProperties"], item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)


def cel_errors(schema: dict[str, Any], value: Any, path: str = "") -> Iterator[str]:
    """Failures of the x-kubernetes-validations rules on the paths present in ``value``."""
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # transition rule: evaluated on update only
        result = _cel(rule["rule"], value)
        if result is not True:
            detail = "" if result is False else f" (evaluation: {result})"
            yield f"{path or '/'}: {rule.get('message', rule['rule'])} [rule: {rule['rule']}]{detail}"
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                yield from cel_errors(sub, value[name], f"{path}/{name}")
        if isinstance(schema.get("additionalProperties"), dict):
            for name, item in value.items():
                yield from cel_errors(schema["additionalProperties"], item, f"{path}/{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from cel_errors(schema["items"], item, f"{path}/{i}")


@cache
def _cel_program(rule: str) -> Any:
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel(rule: str, value: Any) -> bool | str:
    """True / False, or a description of why the rule could not be evaluated."""
    import celpy

    try:
        result = _cel_program(rule).evaluate({"self": celpy.json_to_cel(value)})
    except Exception as exc:  # CELEvalError and friends: the API server rejects these too
        return repr(exc)
    return bool(result) if isinstance(result, bool | celpy.celtypes.BoolType) else repr(result)


# ------------------------------------------------------------------------------ documents


def builtin_errors(doc: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in getattr(exc, "path", ()))
        return [f"/{where}: {getattr(exc, 'message', None) or str(exc).splitlines()[0]}"]
    return []


def is_custom(doc: dict[str, Any]) -> bool:
    return "." in doc.get("apiVersion", "").rpartition("/")[0]


def validate(doc: dict[str, Any], base: Path | None = None) -> list[str]:
    """All errors of one document (empty = valid). KeyError when no CRD for it is available."""
    if not is_custom(doc):
        return builtin_errors(doc)
    errors = builtin_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")})
    errors = [f"metadata: {e}" for e in errors]
    for crd in crd_schemas(doc["apiVersion"], doc["kind"], base):
        label = f"[{crd.source}]"
        for e in crd.validator.iter_errors(doc):
            errors.append(f"{label} /{'/'.join(map(str, e.absolute_path))}: {e.message}")
        defaulted = copy.deepcopy(doc)
        apply_defaults(crd.raw, defaulted)
        errors += [f"{label} {e}" for e in cel_errors(crd.raw, defaulted)]
    return errors


def describe(doc: dict[str, Any]) -> str:
    return f"{doc.get('apiVersion')} {doc.get('kind')} {doc.get('metadata', {}).get('name')}"


def main(argv: list[str]) -> int:
    base = Path(argv[0]) if argv else schemas_dir()
    failed = 0
    for directory in (ROOT / "k8s", ROOT / "k8s" / "secure"):
        for doc in render(directory):
            try:
                errors = validate(doc, base)
            except KeyError as exc:
                errors = [f"NOT VALIDATED: {exc}"]
            failed += bool(errors)
            status = "ok" if not errors else "FAIL"
            sys.stdout.write(f"{status:4} {directory.relative_to(ROOT)}: {describe(doc)}\n")
            for error in errors:
                sys.stdout.write(f"       {error}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
