"""``elbert-stream run``: one worker without Ray until SIGINT/SIGTERM, then drain.

The standalone composition of the three layers: an ``engine.Engine``, a ``stream.Worker`` feeding it
from Kafka, and ``telemetry`` when a Prometheus port or an OTLP endpoint is set. The Ray Serve replica
(``serve/deployment.py``) composes the same three. Settings come from ``ELBERT_*`` environment
variables (docs/settings.md).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from elbert_stream.config import Settings

log = logging.getLogger(__name__)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one worker (no Ray) until SIGINT/SIGTERM, then drain",
                       description="Settings come from ELBERT_* environment variables "
                                   "(see docs/settings.md).")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides ELBERT_KAFKA__BOOTSTRAP_SERVERS)")
    p.add_argument("--replica-id", default=None,
                   help="this worker's stable name: static member id <group>-<id>, transactional id "
                        "<prefix>-<group>-<id> (default: <host>-<slot>, the lowest slot of this host no live "
                        "worker of the group holds: a restart takes the dead one's identity back)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to drain on stop")
    p.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    """One Worker (no Ray) until SIGINT/SIGTERM, then drain; 1 when it stopped with an error."""
    from elbert_stream.engine.engine import Engine
    from elbert_stream.engine.model import load_tokenizer
    from elbert_stream.stream.worker import Worker

    settings = Settings()
    if args.bootstrap:
        settings.kafka.bootstrap_servers = args.bootstrap
    slot = None
    if args.replica_id:
        replica_id = args.replica_id
    else:
        from elbert_stream.stream.identity import claim_local_slot

        slot = claim_local_slot(settings.kafka.group_id)
        replica_id = slot.identity
    engine = Engine.from_settings(settings)
    telemetry = None
    if settings.telemetry.prometheus_port is not None or settings.telemetry.otlp_endpoint:
        from elbert_stream.telemetry.metrics import Telemetry

        telemetry = Telemetry(settings.telemetry, replica_id=replica_id, num_layers=engine.model.num_layers)
    worker = Worker(settings, engine, load_tokenizer(settings.model.path), replica_id=replica_id,
                    telemetry=telemetry)  # its own tokenizer: the worker tokenizes on another thread
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    try:
        failure = None
        while not stop.wait(0.5) and failure is None:
            failure, _ = worker.health()
        if failure is not None and worker.error is None:
            log.error("%s: stopping (exit 1) so that the supervisor restarts it", failure)
        worker.stop(args.drain_timeout)
    finally:
        if telemetry is not None:
            telemetry.shutdown()
        if slot is not None:
            slot.release()
    if worker.error is not None:
        log.error("worker stopped with an error: %r", worker.error)
        return 1
    if failure is not None:
        return 1
    log.info("worker %s stopped: %s", replica_id, worker.stats()["messages"])
    return 0
