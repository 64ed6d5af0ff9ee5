"""The pump: Kafka poll -> decode/tokenize -> Engine.add -> Engine.step -> produce -> commit.

One loop thread owns the consumer, the engine's add/step and every commit. It polls with
``poll_timeout_ms`` when the engine is idle, ``poll(0)`` otherwise (a pending group join always gets
a real wait: ``KafkaSource.poll``). Backpressure: polled requests the engine cannot queue wait in a
backlog (one poll's worth) and every partition is paused until it drains; partitions behind a parked
record (``sink.py``: dead-letter topic not writable) are held on their own. Offsets are committed only
over acknowledged results (``offsets.py``). The worker owns WHEN to commit (``CommitCadence``; forced
at drain and close; at a revoke the source commits itself); the sink owns HOW: asynchronous group
offsets (at_least_once) or one transaction of results and offsets (exactly_once, ``transactions.py``).
The engine is any ``types.EngineLike``: this module imports no torch and no Ray.

``stop(timeout_s)`` drains: stop polling, finish the backlog and the busy slots, flush, commit, close.
With static membership (``group_instance_id``, default ``<group_id>-<replica_id>``) kafka-python sends
no LeaveGroup on close: a restart with the same id gets its partitions back without a rebalance.
``identity`` (``identity.py``) names the transactional id, so a restart fences its predecessor.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from typing import Any

from elbert_stream.adaptive import ExitGears, LoadSignals
from elbert_stream.config import ExitSettings, Settings
from elbert_stream.errors import BadMessage, ElbertError, EngineFailure
from elbert_stream.stream.loop_stats import LoopStats
from elbert_stream.stream.offsets import CommitCadence, OffsetTracker, TopicPartition
from elbert_stream.stream.records import InputMessage, decode_input, output_record, trace_headers
from elbert_stream.stream.sink import KafkaSink
from elbert_stream.stream.source import KafkaSource
from elbert_stream.stream.sync_jobs import SyncJob, SyncRef, job_requests, tokenize_each
from elbert_stream.types import EngineLike, Prediction, Request

log = logging.getLogger(__name__)
STATS_EVERY_S = 0.25  # engine stats snapshot refresh
LAG_EVERY_S = 1.0


class Worker:
    """One engine fed from Kafka (see module doc). Public API: ``start``, ``run``, ``stop``, ``alive``,
    ``error``, ``set_exit_policy``, ``gears`` (exit gear), ``classify``, ``stats``, ``telemetry_snapshot``."""

    def __init__(self, settings: Settings, engine: EngineLike, tokenizer: Any = None, *, replica_id: str,
                 telemetry: Any = None, identity: str | None = None) -> None:
        """``identity``: stable across restarts and never shared by two live workers (``identity.py``);
        names the transactional id (``<prefix>-<identity>``); default: the static member id, else
        ``replica_id``."""
        self.settings = settings.model_copy(deep=True)
        k = self.settings.kafka
        if k.group_instance_id is None:  # static membership by default; "" = dynamic membership
            k.group_instance_id = f"{k.group_id}-{replica_id}"
        elif not k.group_instance_id:
            k.group_instance_id = None
        self.identity = identity or k.group_instance_id or replica_id
        self.engine = engine
        self.tokenizer = tokenizer
        self.replica_id = replica_id
        self.telemetry = telemetry
        self.error: BaseException | None = None
        self.tracker = OffsetTracker()
        self._cadence = CommitCadence(k.commit_interval_s)
        self.source: KafkaSource | None = None
        self.sink: KafkaSink | None = None
        self._backlog: deque[Request] = deque()
        self._jobs: deque[SyncJob] = deque()
        self._jobs_lock = threading.Lock()
        self._revoked: set[TopicPartition] = set()
        self._num_dropped_revoked = 0
        self._stop = threading.Event()
        self._running = threading.Event()
        self._drain_deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._loop = LoopStats(engine.num_layers)
        self.model_name = engine.model_name
        self.model_version = engine.model_version
        self.gears = ExitGears(engine.set_exit_settings, self.settings.exit, self.settings.adaptive,
                               self.settings.model.path)  # the exit gear (adaptive.py)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Worker:
        """Run the loop on a background thread; returns once it started."""
        if self._thread is not None:
            raise ElbertError(f"worker {self.replica_id} already started")
        self._thread = threading.Thread(target=self._run_quietly, name=f"elbert-worker-{self.replica_id}",
                                        daemon=True)
        self._running.set()  # alive() from now on, until the loop ends
        self._thread.start()
        return self

    def run(self) -> None:
        """The loop, in the calling thread, until ``stop``; raises the error that ended it."""
        self._running.set()
        try:
            self._open()
            while not self._stop.is_set():
                self._iteration()
            self._drain()
        except BaseException as e:
            self.error = e
            log.exception("worker %s failed", self.replica_id)
            raise
        finally:
            self._close()
            self._running.clear()

    def _run_quietly(self) -> None:
        with contextlib.suppress(BaseException):  # recorded in self.error; the health check reports it
            self.run()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Drain within ``timeout_s`` (work left then is not committed: reprocessed by the next owner)."""
        self._drain_deadline = time.monotonic() + max(0.0, timeout_s - 1.0)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s + 5.0)
            if self._thread.is_alive():
                log.error("worker %s did not stop within %.1fs", self.replica_id, timeout_s)

    def alive(self) -> bool:
        return self._running.is_set() and self.error is None

    def health(self) -> tuple[str | None, list[str]]:
        """(failure, warnings). ``failure``: why this worker cannot work and a restart is the remedy
        (it died, or ``KafkaSource.stuck_joining``); None when fine. ``warnings``: degraded but
        serving (parked records: a topic refuses them); a restart would not help, so they never
        fail the health check."""
        if self.error is not None:
            return f"worker {self.replica_id} failed: {self.error!r}", []
        if not self._running.is_set():
            return f"worker {self.replica_id}: its thread is not running", []
        warnings = [p] if self.sink is not None and (p := self.sink.problem()) else []
        stuck = self.source.stuck_joining() if self.source is not None else None
        return (f"worker {self.replica_id}: {stuck}" if stuck else None), warnings

    # ---- control from other threads -----------------------------------------------------------
    def set_exit_policy(self, exit_settings: ExitSettings) -> None:
        """Swap the exit rule (thread-safe; takes effect at the engine's next step). Raises
        ConfigError for settings the model cannot take, or while adaptive exit sets them (gears)."""
        self.gears.set_exit(exit_settings)
        self.settings.exit = exit_settings

    def classify(self, texts: list[str], timeout_s: float = 30.0) -> list[Prediction]:
        """Classify ``texts`` through the same engine (not Kafka-backed); blocks up to ``timeout_s``.
        Raises BadMessage for a text the engine cannot take, EngineFailure when the worker is down,
        TimeoutError when the results did not come in time."""
        if not self.alive():
            raise EngineFailure(f"worker {self.replica_id} is not running: {self.error!r}")
        job = SyncJob(list(texts))
        if not job.texts:
            return []
        with self._jobs_lock:
            self._jobs.append(job)
        if not self.alive():  # the loop ended meanwhile and will not take the job
            job.fail(EngineFailure(f"worker {self.replica_id} stopped"), None)
        return job.wait(timeout_s)

    # ---- the loop -----------------------------------------------------------------------------
    def _open(self) -> None:
        k = self.settings.kafka
        eos = k.delivery == "exactly_once"
        self.source = KafkaSource(k, self.tracker, client_id=f"elbert-{self.replica_id}",
                                  on_revoke=self._on_revoke, transactional=eos)
        if eos:
            from elbert_stream.stream.identity import transactional_id
            from elbert_stream.stream.transactions import TransactionalSink

            self.sink = TransactionalSink(k, self.tracker, replica_id=self.replica_id,
                                          transactional_id=transactional_id(k.transactional_id_prefix,
                                                                            self.identity),
                                          client_id=f"elbert-{self.replica_id}")
        else:
            self.sink = KafkaSink(k, self.tracker, replica_id=self.replica_id,
                                  client_id=f"elbert-{self.replica_id}")
        if self.telemetry is not None:
            self.telemetry.start(stats=self.telemetry_snapshot)
        log.info("worker %s: group %s as %s on %s", self.replica_id, k.group_id, k.group_instance_id,
                 k.input_topics)

    def _iteration(self) -> None:
        assert self.source is not None and self.sink is not None  # set by _open
        self.sink.raise_failures()
        self.sink.retry_parked()
        self.source.hold(self.sink.blocked())
        self._take_jobs()
        self._feed()
        if self._backlog:
            self.source.pause()
        else:
            self.source.resume()
        busy = self.engine.has_work()
        msgs = self.source.poll(0 if busy or self._backlog else self.settings.kafka.poll_timeout_ms)
        self._apply_revokes()
        msgs = [m for m in msgs if self.tracker.is_current(m.topic, m.partition, m.epoch)]
        if msgs:
            self._loop.arrived(len(msgs))
            self._ingest(msgs)
            self._feed()
        self.gears.update(self._load_signals)  # may shift the exit gear for the next step
        if self.engine.has_work():
            self._route(self.engine.step())
        self._commit()
        self._refresh_stats()

    def _load_signals(self) -> LoadSignals:
        head = self._backlog[0].arrival_s if self._backlog else None
        return self._loop.load_signals(len(self._backlog), head)

    def _ingest(self, msgs: list[InputMessage]) -> None:
        """Decode and tokenize polled messages into backlog Requests; bad ones become dead letters."""
        k = self.settings.kafka
        good: list[tuple[InputMessage, str]] = []
        for m in msgs:
            try:
                d = decode_input(m.value, input_format=k.input_format, max_message_bytes=k.max_message_bytes,
                                 max_text_chars=k.max_text_chars)
            except BadMessage as e:
                self._dead_letter(m, e)
                continue
            m.id = d.id
            good.append((m, d.text))
        for (m, _), ids in zip(good, self._tokenize([t for _, t in good]), strict=True):
            if isinstance(ids, BadMessage):
                self._dead_letter(m, ids)
            else:
                self._backlog.append(Request(ids, meta=m, arrival_s=m.polled_s))

    def _tokenize(self, texts: list[str]) -> list[list[int] | BadMessage]:
        max_length = self.engine.max_length
        if self.tokenizer is None:
            return tokenize_each(self.engine.tokenize, texts)
        tok = self.tokenizer
        return tokenize_each(lambda b: list(tok(b, truncation=True, max_length=max_length)["input_ids"]),
                             texts)

    def _feed(self) -> None:
        """Move backlog requests into the engine until its queue is full."""
        while self._backlog:
            req = self._backlog[0]
            try:
                if not self.engine.add(req):
                    return
            except BadMessage as e:
                self._backlog.popleft()
                self._reject(req, e)
                continue
            self._backlog.popleft()

    def _reject(self, req: Request, e: BadMessage) -> None:
        if isinstance(req.meta, SyncRef):
            req.meta.job.fail(e, req.meta.index)
        else:
            self._dead_letter(req.meta, e)

    def _current(self, msg: InputMessage) -> bool:
        """False for a message of a partition revoked since it was polled: its new owner re-reads it
        from the last commit (which never covers it), so answering it would only add a duplicate."""
        if self.tracker.is_current(msg.topic, msg.partition, msg.epoch):
            return True
        self._num_dropped_revoked += 1
        return False

    def _dead_letter(self, msg: InputMessage, e: BadMessage) -> None:
        assert self.sink is not None
        if not self._current(msg):
            return
        headers = trace_headers(msg)
        if self.telemetry is not None:
            headers = self.telemetry.record_dead_letter(e.reason, msg.headers)
        self.sink.send_dead_letter(msg, e.reason, e.detail, trace=headers)

    def _route(self, preds: list[Prediction]) -> None:
        """Finished samples: Kafka ones to the output topic, synchronous ones to their caller."""
        assert self.sink is not None
        gear = self.gears.gear  # the gear of the step that made preds (shifted on this thread, before it)
        self._loop.finished(preds, default_gear=gear == 0)
        for p in preds:
            meta = p.meta
            if isinstance(meta, SyncRef):
                meta.job.set(meta.index, p)
                continue
            if not self._current(meta):
                continue
            headers = trace_headers(meta)
            if self.telemetry is not None:
                headers = self.telemetry.record_prediction(p, meta.headers,
                                                           source_timestamp_ms=meta.timestamp_ms)
            rec = output_record(meta, p, model_name=self.model_name, model_version=self.model_version,
                                replica_id=self.replica_id, gear=gear)
            self.sink.send_output(meta, rec, headers)

    def _take_jobs(self) -> None:
        with self._jobs_lock:
            jobs, self._jobs = list(self._jobs), deque()
        for job in jobs:  # ahead of Kafka work: a caller is waiting
            self._backlog.extendleft(reversed(job_requests(job, self._tokenize)))

    def _on_revoke(self, tps: set[TopicPartition]) -> None:
        """Called on the consumer's IO thread: only record; ``_apply_revokes`` runs on the loop."""
        with self._jobs_lock:
            self._revoked |= tps
        drop = getattr(self.sink, "drop", None)  # exactly_once: held results of these partitions
        if drop is not None:
            drop(tps)

    def _apply_revokes(self) -> None:
        """Drop backlog messages of revoked partitions (their new owner re-reads them)."""
        with self._jobs_lock:
            tps, self._revoked = self._revoked, set()
        if tps:
            self._backlog = deque(r for r in self._backlog if isinstance(r.meta, SyncRef)
                                  or TopicPartition(r.meta.topic, r.meta.partition) not in tps)
            if self.sink is not None:
                self.sink.parking.release(tps)

    def _drain(self) -> None:
        """Finish backlog and busy slots (until the deadline), flush, commit."""
        assert self.source is not None and self.sink is not None
        deadline = self._drain_deadline
        log.info("worker %s draining: %d in backlog, engine busy=%s", self.replica_id, len(self._backlog),
                 self.engine.has_work())
        while (self._backlog or self.engine.has_work()) and time.monotonic() < deadline:
            self.sink.raise_failures()
            self._feed()
            if self.engine.has_work():
                self._route(self.engine.step())
            self._commit()
        left = len(self._backlog) + (1 if self.engine.has_work() else 0)
        if left:
            log.warning("worker %s: drain deadline hit with work left; it stays uncommitted", self.replica_id)
        self.sink.flush(max(1.0, deadline - time.monotonic()) if deadline < float("inf") else None)
        self.sink.raise_failures()
        self._commit(force=True)

    def _close(self) -> None:
        with self._jobs_lock:
            jobs, self._jobs = list(self._jobs), deque()
        for job in jobs + [r.meta.job for r in self._backlog if isinstance(r.meta, SyncRef)]:
            job.fail(EngineFailure(f"worker {self.replica_id} stopped"), None)
        for closer in (self.sink.close if self.sink is not None else None, self._close_source):
            try:
                if closer is not None:
                    closer()
            except Exception:  # noqa: BLE001 - closing must not mask the loop's error
                log.exception("worker %s: error while closing", self.replica_id)

    def _commit(self, force: bool = False) -> None:
        """Commit on the cadence (or now); the sink commits offsets alone, or with exactly_once one
        transaction of outputs and offsets."""
        assert self.source is not None and self.sink is not None
        if self._cadence.due(force):
            self.sink.commit(self.source, blocking=force)

    def _close_source(self) -> None:
        if self.source is not None:
            if self.error is None:
                self._commit(force=True)
            self.source.close()

    # ---- stats ---------------------------------------------------------------------------------
    def _refresh_stats(self) -> None:
        now = time.monotonic()
        if now - self._loop.engine_at >= STATS_EVERY_S:
            self._loop.set_engine(self.engine.stats(), now)
        if self.source is not None and (now - self._loop.lag_at >= LAG_EVERY_S
                                        or len(self.source.consumer.assignment()) != len(self._loop.lag())):
            self._loop.set_lag(self.source.lag(), self.source.total_partitions(), now)

    def stats(self) -> dict[str, Any]:
        """Counters, rates and the autoscaler's inputs (see docs/streaming.md); cheap, any thread."""
        sink, source = self.sink, self.source
        counts: Counter[str] = sink.counts_snapshot() if sink is not None else Counter()
        out = self._loop.snapshot()
        out.update(
            replica_id=self.replica_id, alive=self.alive(),
            error=None if self.error is None else repr(self.error),
            messages={o: counts.get(o, 0) for o in ("ok", "dead_letter", "error")},
            dead_letter_reasons={k.split(".", 1)[1]: v for k, v in counts.items()
                                 if k.startswith("dead_letter.")},
            backlog=len(self._backlog), paused=bool(source and source.paused),
            held_partitions=sorted(f"{t}[{p}]" for t, p in source.held) if source is not None else [],
            parked=sink.num_parked if sink is not None else 0,
            problems=[p for p in (self.health()[0], *self.health()[1]) if p],
            produce_in_flight=sink.in_flight if sink is not None else 0,
            pending_offsets=self.tracker.total_pending(),
            num_commits=source.num_commits if source is not None else 0,
            num_revocations=source.num_revocations if source is not None else 0,
            num_dropped_revoked=self._num_dropped_revoked,
            exit_policy=self.settings.exit.model_dump(), adaptive=self.gears.describe(),
        )
        return out

    def telemetry_snapshot(self) -> Any:
        """The ``telemetry.StatsSnapshot`` read when metrics are collected."""
        return self._loop.telemetry_snapshot(len(self._backlog), self.sink.num_parked if self.sink else 0,
                                             len(self.source.held) if self.source else 0, self.gears.gear)
