"""Ray Serve deployment: each replica owns ONE :class:`~elbert_stream.stream.worker.Worker`.

``serve/`` is the only package that imports Ray. A replica:

* builds ``Settings()`` from the environment (the edge), then applies the bind-time overrides
  (``ElbertWorker.bind(overrides)``) and the deployment's ``user_config`` on top (deep merge, same
  keys as ``Settings``: ``{"exit": {"tau": 0.2}, "kafka": {...}}``);
* starts its worker on a background thread (kafka-python's consumer is not thread-safe, so the
  worker's thread owns it) once the first ``reconfigure`` has run, so the first ``user_config``
  is in force before the consumer joins the group;
* runs on whatever ``ray_actor_options`` gave it: ``model.device="auto"`` picks CUDA when Ray
  assigned a GPU, and torch uses as many threads as Ray assigned CPUs.

``reconfigure(user_config)``: the ``exit`` and ``adaptive`` (load-adaptive exit gears,
docs/adaptive.md) sections apply live (between engine steps, no restart; ``autoscaling`` is
accepted too, but only the controller-side policy's kwargs drive scaling). A change to ``model``,
``engine``, ``kafka`` or ``telemetry`` restarts the worker inside the replica: the old one drains
(finish in-flight, flush, commit), then a new engine and worker start. ``check_health`` raises once
the worker has died, so Serve replaces the replica.
``__del__`` (Serve's graceful stop) drains within ``graceful_shutdown_timeout_s``.

Kafka group membership (measured on Tansu 0.6; docs/serving.md has the table): by default every
replica is a DYNAMIC member. Tansu expires a dead dynamic member after ``kafka.session_timeout_ms``
but never a departed STATIC one (its partitions stay with the ghost until the same
``group_instance_id`` returns), and Serve's ranks move (a replacement often starts on a new rank
and is re-packed a moment later), so rank-based static ids of killed replicas leave ghosts that
wedge the group (a clean stop leaves the group: ``kafka.leave_group_on_close``).
Setting ``kafka.group_instance_id`` (a prefix) opts into static membership as
``"{prefix}-r{rank}"`` (KIP-345: meant for a real Kafka, which expires departed static members);
the worker then restarts under its new id when Serve re-packs ranks.

HTTP (``route_prefix``, default ``/``): ``POST /classify`` ``{"texts": [...]}`` ->
``{"predictions": [...]}`` through the same engine; ``GET /stats``; ``GET /healthz``.
"""


import logging
import threading
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve

from elbert_stream.config import Settings
from elbert_stream.errors import BadMessage, ElbertError
from elbert_stream.serve.overrides import (
    RESTART_SECTIONS,
    changed_sections,
    group_instance_id,
    merge_settings,
    parse_overrides,
    rank_of,
)

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ElbertWorker"
DEFAULT_GRACEFUL_SHUTDOWN_S = 30.0
DRAIN_MARGIN_S = 2.0  # leave Serve this much of graceful_shutdown_timeout_s after our drain
MAX_CLASSIFY_TEXTS = 256


# ---- replica-side helpers (defined before the class: Serve pickles it when decorated) -----
def _graceful_shutdown_s(ctx: Any) -> float:
    """``graceful_shutdown_timeout_s`` of this deployment (a private field; default if absent)."""
    config = getattr(ctx, "_deployment_config", None)
    value = getattr(config, "graceful_shutdown_timeout_s", None)
    return float(value) if value else DEFAULT_GRACEFUL_SHUTDOWN_S


def _replica_log_level() -> None:
    """``ELBERT_LOG_LEVEL`` (e.g. INFO) sets the ``elbert_stream`` loggers' level in the replica
    (Serve's logging_config only covers ``ray.serve``); read here, at the edge."""
    import os

    level = os.environ.get("ELBERT_LOG_LEVEL")
    if level:
        logger = logging.getLogger("elbert_stream")
        logger.setLevel(level.upper())
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)


def _set_torch_threads() -> None:
    """torch threads = CPUs Ray assigned to this replica (at least 1; a fractional share gets 1)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    if cpus > 0:
        torch.set_num_threads(max(1, int(cpus)))


def _make_telemetry(settings: Settings, replica_tag: str, engine: Any, local_rank: int) -> Any:
    """Telemetry for one replica; a fixed Prometheus port is offset by the replica's local rank so
    replicas on one node do not collide."""
    from elbert_stream.telemetry.metrics import Telemetry

    tel = settings.telemetry
    if tel.prometheus_port:
        tel = tel.model_copy(update={"prometheus_port": tel.prometheus_port + local_rank})
    return Telemetry(tel, replica_id=replica_tag, num_layers=engine.model.num_layers)


# ---- HTTP bodies -----------------------------------------------------------------------------
class ClassifyBody(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=MAX_CLASSIFY_TEXTS)
    timeout_s: float = Field(30.0, gt=0, le=300, description="give up after this many seconds")


api = FastAPI(title="elbert-stream", description="ELBERT streaming worker replica")


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=16,
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=DEFAULT_GRACEFUL_SHUTDOWN_S,
    graceful_shutdown_wait_loop_s=1,
)
@serve.ingress(api)
class ElbertWorker:
    """One replica = one engine + one Kafka worker (see the module docstring for the contract)."""

    def __init__(self, overrides: Mapping[str, Any] | str | None = None) -> None:
        _replica_log_level()
        ctx = serve.get_replica_context()
        self.replica_tag: str = ctx.replica_tag
        self._local_rank = int(getattr(ctx.rank, "local_rank", 0) or 0) if ctx.rank is not None else 0
        self._rank = rank_of(ctx.rank)
        self._grace_s = _graceful_shutdown_s(ctx)
        self._base = merge_settings(Settings(), parse_overrides(overrides))  # env, then bind args
        self._settings = self._base
        self._lock = threading.RLock()
        self._worker: Any = None
        self._telemetry: Any = None
        self._configured = False
        self._closed = False
        from elbert_stream.load import ReplicaReporter

        self._reporter = ReplicaReporter.create()  # keeps this replica's capacity estimate (EWMA)
        _set_torch_threads()
        log.info("replica %s created (grace %.0fs)", self.replica_tag, self._grace_s)

    # ---- Serve hooks -------------------------------------------------------------------------
    def reconfigure(self, user_config: Mapping[str, Any] | None, rank: Any = None) -> None:
        """Apply ``user_config`` (Settings-shaped, deep-merged on env + bind overrides).

        Taking ``rank`` makes Serve call this even without a user_config, so the worker always
        starts here, after the first config is known.
        """
        new = merge_settings(self._base, user_config or {})
        new_rank = rank_of(rank)
        with self._lock:
            if self._closed:
                return
            # the rank names the static member id and the transactional id (stream/identity.py)
            ranked = bool(new.kafka.group_instance_id) or new.kafka.delivery == "exactly_once"
            if ranked and self._worker is not None and new_rank is not None and new_rank != self._rank:
                log.info("replica %s: rank %s -> %s: restarting the worker under its new identity",
                         self.replica_tag, self._rank, new_rank)
                self._stop_worker(max(1.0, self._grace_s - DRAIN_MARGIN_S))
            if new_rank is not None:
                self._rank = new_rank
            if self._worker is None:
                self._settings = new
                self._start()
            else:
                self._apply(new)
            self._configured = True

    def check_health(self) -> None:
        """Raise when the worker died (Serve then replaces the replica)."""
        with self._lock:
            if not self._configured and not self._closed:  # reconfigure never came: start anyway
                self.reconfigure(None)
            worker = self._worker
        if worker is None:
            return
        failure, _warnings = worker.health()  # warnings (parked records) are in /healthz and /stats
        if failure is not None:
            raise ElbertError(f"replica {self.replica_tag}: {failure}")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The exit-depth load report for ``autoscaling.ExitDepthPolicy`` (flat floats; keys in
        ``load.REPORT_KEYS``); empty until the worker runs."""
        worker = self._worker
        if worker is None:
            return {}
        return self._reporter.report(worker.stats())

    def __del__(self) -> None:
        """Serve's graceful stop: drain the worker within ``graceful_shutdown_timeout_s``."""
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ failed before the worker existed
            return
        with lock:
            self._closed = True
            self._stop_worker(max(1.0, self._grace_s - DRAIN_MARGIN_S))

    # ---- HTTP --------------------------------------------------------------------------------
    @api.post("/classify")
    def classify(self, body: ClassifyBody) -> dict[str, Any]:
        """Classify ``texts`` through the replica's engine (same batching as the stream)."""
        worker = self._running_worker()
        limit = self._settings.kafka.max_text_chars
        for i, text in enumerate(body.texts):
            if not text.strip():
                raise HTTPException(400, f"texts[{i}] is empty")
            if len(text) > limit:
                raise HTTPException(400, f"texts[{i}] has {len(text)} chars > max_text_chars={limit}")
        try:
            predictions = worker.classify(body.texts, timeout_s=body.timeout_s)
        except BadMessage as e:
            raise HTTPException(400, str(e)) from e
        except TimeoutError as e:
            raise HTTPException(504, f"classification timed out after {body.timeout_s}s") from e
        except ElbertError as e:  # EngineFailure: the worker stopped or died meanwhile
            raise HTTPException(503, f"replica {self.replica_tag}: {e}") from e
        return {"replica_id": self.replica_tag, "predictions": [p.to_dict() for p in predictions]}

    @api.get("/stats")
    def stats(self) -> dict[str, Any]:
        """Worker stats, the exit settings in force, and the telemetry summary when available."""
        worker = self._worker
        summary = getattr(self._telemetry, "summary", None)
        tel = summary() if callable(summary) else None
        return {
            "replica_id": self.replica_tag,
            "group_instance_id": self.group_instance_id,
            "exit": self._settings.exit.model_dump(),
            "exit_gear": worker.gears.describe() if worker is not None else None,
            "worker": worker.stats() if worker is not None else None,
            "telemetry": tel.to_dict() if tel is not None and hasattr(tel, "to_dict") else tel,
        }

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        try:
            self.check_health()
        except ElbertError as e:
            raise HTTPException(503, str(e)) from e
        worker = self._worker
        warnings = worker.health()[1] if worker is not None else []
        return {"ok": True, "replica_id": self.replica_tag, "warnings": warnings}

    # ---- internals ---------------------------------------------------------------------------
    @property
    def group_instance_id(self) -> str:
        return group_instance_id(self._settings, self._rank if self._rank is not None else 0)

    def _running_worker(self) -> Any:
        worker = self._worker
        if worker is None or not worker.alive():
            raise HTTPException(503, f"replica {self.replica_tag} has no running worker")
        return worker

    def _start(self) -> None:
        """Build engine, telemetry and worker from ``self._settings`` and start the worker."""
        from elbert_stream.engine.engine import Engine
        from elbert_stream.engine.model import load_tokenizer
        from elbert_stream.stream.worker import Worker

        settings = self._settings.model_copy(deep=True)
        settings.kafka.group_instance_id = self.group_instance_id  # "" = dynamic (Worker contract)
        engine = Engine.from_settings(settings)  # loads the checkpoint's tokenizer too
        self._telemetry = _make_telemetry(settings, self.replica_tag, engine, self._local_rank)
        from elbert_stream.stream.identity import serve_identity

        identity = serve_identity(settings.kafka.group_id, self._rank if self._rank is not None else 0)
        worker = Worker(settings, engine, load_tokenizer(settings.model.path), replica_id=self.replica_tag,
                        telemetry=self._telemetry, identity=identity)  # its own tokenizer: another thread
        worker.start()
        self._worker = worker
        log.info("replica %s: worker started as %s (member %s) on %s", self.replica_tag, identity,
                 settings.kafka.group_instance_id or "dynamic", settings.kafka.input_topics)

    def _apply(self, new: Settings) -> None:
        """Live-apply ``exit``/``autoscaling``; restart the worker for any other change."""
        changed = changed_sections(self._settings, new)
        if not changed:
            return
        if changed & RESTART_SECTIONS:
            log.info("replica %s: %s changed: restarting the worker", self.replica_tag, sorted(changed))
            self._stop_worker(max(1.0, self._grace_s - DRAIN_MARGIN_S))
            self._settings = new
            self._start()
            return
        gears = self._worker.gears
        if "adaptive" in changed and not new.adaptive.enabled:  # off first: then exit may be set by hand
            gears.configure(new.adaptive)
        if "exit" in changed:  # refused (ConfigError) while adaptive exit stays on
            self._worker.set_exit_policy(new.exit)
            log.info("replica %s: exit policy now %s", self.replica_tag, new.exit.model_dump())
        if "adaptive" in changed and new.adaptive.enabled:
            gears.configure(new.adaptive)
            log.info("replica %s: adaptive exit %s", self.replica_tag, new.adaptive.model_dump())
        self._settings = new

    def _stop_worker(self, timeout_s: float) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            try:
                worker.stop(timeout_s)
            except Exception:  # noqa: BLE001 - a failed drain must not block the replacement
                log.exception("replica %s: worker did not stop cleanly", self.replica_tag)
        telemetry, self._telemetry = self._telemetry, None
        shutdown = getattr(telemetry, "shutdown", None)
        if callable(shutdown):
            shutdown()


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """Application builder: ``serve run elbert_stream.serve.deployment:build_app settings='{...}'``."""
    overrides = parse_overrides((args or {}).get("settings"))
    return ElbertWorker.bind(overrides)  # type: ignore[attr-defined]  # added by @serve.deployment


app = ElbertWorker.bind()  # type: ignore[attr-defined]
