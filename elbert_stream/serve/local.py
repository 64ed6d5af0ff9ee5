"""A local Ray + Serve for the demo, the benchmark and the tests: a private single-node Ray on
loopback, the app deployed the way ``serve deploy`` does, and helpers to wait for, kill and remove
replicas. Not used by a production replica.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Mapping
from typing import Any

from ray import serve

from elbert_stream.errors import ElbertError
from elbert_stream.serve.deployment import DEPLOYMENT_NAME

log = logging.getLogger(__name__)


def start_local_ray(num_cpus: int, *, http_port: int, log_to_driver: bool = False) -> None:
    """Start a private single-node Ray on loopback (no dashboard) and Serve's proxy on
    ``127.0.0.1:http_port``. Stop it with :func:`shutdown_local_ray`."""
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=log_to_driver, namespace="elbert-stream")
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})


_LOCAL_APPS: dict[str, dict[str, Any]] = {}  # the apps this process deployed, by name


def run_local_app(overrides: Mapping[str, Any] | None = None, *, name: str = "elbert", num_replicas: int = 1,
                  num_cpus: float = 1.0, user_config: Mapping[str, Any] | None = None,
                  route_prefix: str = "/", wait: bool = True, **options: Any) -> None:
    """Deploy or update the app on the running local Serve the way ``serve deploy`` does: a
    declarative config (``import_path: elbert_stream.serve.deployment:build_app``, ``args.settings`` =
    ``overrides``). Deploying the same ``name`` again is a config update, as in production: a new
    ``num_replicas`` scales (graceful stop of removed replicas), a new ``user_config`` reaches
    ``reconfigure`` on the running replicas; changed ``overrides`` redeploy (rolling). ``options``
    are further deployment fields (``graceful_shutdown_timeout_s``, ``autoscaling_config``...);
    ``wait=False`` returns without waiting for the app to be RUNNING.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    dep = {"name": DEPLOYMENT_NAME, "user_config": dict(user_config or {}),
           "ray_actor_options": {"num_cpus": num_cpus}, **options}
    if "autoscaling_config" not in options:
        dep["num_replicas"] = num_replicas
    _LOCAL_APPS[name] = {"name": name, "route_prefix": route_prefix,
                         "import_path": "elbert_stream.serve.deployment:build_app",
                         "args": {"settings": dict(overrides or {})}, "deployments": [dep]}
    config = ServeDeploySchema.model_validate({"applications": list(_LOCAL_APPS.values())})
    client = _get_global_client()
    if client is None:
        raise ElbertError("no Ray Serve controller: call serve.start() first")
    client.deploy_apps(config, _blocking=wait)


def delete_local_app(name: str) -> None:
    """Remove an app deployed with :func:`run_local_app` (its replicas drain and stop)."""
    _LOCAL_APPS.pop(name, None)
    serve.delete(name)


def replica_actor_names(app_name: str) -> list[str]:
    """Ray actor names of the app's live ElbertWorker replicas (namespace ``serve``)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{DEPLOYMENT_NAME}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(prefix))


def wait_until_consuming(app_name: str, http_port: int, route_prefix: str = "/", *, num_replicas: int,
                         timeout_s: float = 45.0) -> set[str]:
    """Poll ``GET {route_prefix}/stats`` until ``num_replicas`` live replicas together own every
    input partition; returns their replica tags. Raises ElbertError on timeout."""
    import time
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{http_port}{route_prefix.rstrip('/')}/stats"
    seen: dict[str, tuple[int, int]] = {}  # replica -> (assigned, total)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            body = {}
        worker = body.get("worker") or {}
        if worker:
            seen[body["replica_id"]] = (worker["num_partitions_assigned"], worker["total_input_partitions"])
        live = {name.rsplit("#", 1)[-1] for name in replica_actor_names(app_name)}
        owners = {r for r, (n, _) in seen.items() if n > 0 and r in live}
        total = max((t for _, t in seen.values()), default=0)
        if len(owners) == num_replicas and total and sum(seen[r][0] for r in owners) == total:
            return owners
        time.sleep(0.3)
    raise ElbertError(f"{num_replicas} replicas of {app_name!r} did not own all partitions within "
                      f"{timeout_s}s; last seen {seen}")


def kill_replica(actor_name: str) -> None:
    """Kill one replica's actor at once (no graceful drain): what a crash looks like to Kafka."""
    import ray

    ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)


def shutdown_local_ray() -> None:
    """Stop Serve and Ray started by :func:`start_local_ray` (idempotent)."""
    import ray

    _LOCAL_APPS.clear()
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            # serve.shutdown() leaves its controller client's ActorHandle and an ObjectRef of the
            # controller's graceful_shutdown task in reference cycles (Ray 2.60). If any thread's
            # cyclic GC frees them while ray.shutdown() is tearing the core worker down, the driver
            # _exit(1)s on the spot and silently ("The core worker has already been shutdown ... The
            # process will exit", in python-core-driver-*.log only): a pytest run died that way after
            # its Serve module. Free them while the worker is alive; no cyclic GC until it is gone.
            gc.collect()
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                ray.shutdown()
            finally:
                if was_enabled:
                    gc.enable()
