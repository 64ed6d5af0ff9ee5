"""The pipelined replica: Kafka -> intake -> tokenizer -> engine -> output -> Kafka, one thread each.

==========  ===============================================  =================================
stage       owns (its thread only)                           hands on through
==========  ===============================================  =================================
intake      the consumer (``KafkaSource``: poll, pause /     ``Channel`` of decoded texts and
            resume / hold, commit, lag, close), decoding,    dead letters (bounded by the
            the ``CommitCadence`` (``intake.py``)            ``Budget``)
tokenizer   the tokenizer, one batch call per hand-off       ``Channel`` of ``Request``s
            (``tokenizing.py``)                              (same budget)
engine      ``Engine.add`` / ``step`` / ``stats``: nothing   ``Channel`` of predictions and
            else (``engine_stage.py``; ``Worker.run``'s      dead letters (``max_poll_records``
            thread)                                          + ``max_slots`` items)
output      encoding, ``KafkaSink.send_*``, parked retries,  the producer; its delivery
            ``raise_failures``, telemetry (``output.py``)    callbacks mark offsets done
==========  ===============================================  =================================

Backpressure end to end: at most ``max_poll_records`` polled messages are on their way to the
engine (``Budget``); while none is left, the intake pauses every partition (and partitions behind a
parked record are held on their own, ``sink.py``). The engine stage stops taking work while the
engine's queue is full, and waits while the output channel is full. Delivery semantics are the
sink's and the tracker's, unchanged: at_least_once commits only contiguous acknowledged offsets
(``offsets.py``), exactly_once one transaction of results and offsets (``transactions.py``). A revoked
partition's work is dropped in every stage through the tracker's epochs (``pipeline.keep_current``).

``stop(timeout_s)`` drains: the intake stops polling and closes its channel; each stage finishes what
it holds and closes the next; the output stage flushes; the intake commits and closes the sink and
the source. A failure in any stage aborts every stage at once (no final commit) and is ``error``.
With static membership (``group_instance_id``, default ``<group_id>-<replica_id>``) kafka-python sends
no LeaveGroup on close: a restart with the same id gets its partitions back without a rebalance.
``identity`` (``identity.py``) names the transactional id, so a restart fences its predecessor.
The engine is any ``types.EngineLike``: this module imports no torch and no Ray.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from elbert_stream.adaptive import ExitGears
from elbert_stream.config import ExitSettings, Settings
from elbert_stream.errors import ElbertError, EngineFailure
from elbert_stream.stream.engine_stage import EngineStage
from elbert_stream.stream.intake import Intake
from elbert_stream.stream.loop_stats import LoopStats
from elbert_stream.stream.memory import limit_malloc_arenas
from elbert_stream.stream.offsets import OffsetTracker, TopicPartition
from elbert_stream.stream.output import OutputStage
from elbert_stream.stream.pipeline import Budget, Channel
from elbert_stream.stream.sink import KafkaSink
from elbert_stream.stream.source import KafkaSource
from elbert_stream.stream.sync_jobs import SyncJob, SyncRef, batch_tokenizer
from elbert_stream.stream.tokenizing import TokenizeStage
from elbert_stream.types import EngineLike, Prediction

log = logging.getLogger(__name__)
JOIN_S = 10.0  # how long the loop waits for a helper stage to end after it ended itself


class Worker:
    """One engine fed from Kafka (see module doc). Public API: ``start``, ``run``, ``stop``, ``alive``,
    ``error``, ``health``, ``set_exit_policy``, ``gears`` (exit gear), ``classify``, ``stats``,
    ``telemetry_snapshot``."""

    def __init__(self, settings: Settings, engine: EngineLike, tokenizer: Any = None, *, replica_id: str,
                 telemetry: Any = None, identity: str | None = None) -> None:
        """``identity``: stable across restarts and never shared by two live workers (``identity.py``);
        names the transactional id (``<prefix>-<identity>``); default: the static member id, else
        ``replica_id``. ``tokenizer``: the checkpoint's (a Hugging Face tokenizer, or a callable like
        one; fast ones run through their Rust backend, ``sync_jobs.batch_tokenizer``); default: the
        engine's ``tokenize``."""
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
        self.source: KafkaSource | None = None
        self.sink: KafkaSink | None = None
        self._revoked: set[TopicPartition] = set()
        self._revoked_lock = threading.Lock()
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._running = threading.Event()
        self._drain_deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._loop = LoopStats(engine.num_layers)
        self.model_name = engine.model_name
        self.model_version = engine.model_version
        # the exit gear (adaptive.py): shifted by the engine stage before each step
        self.gears = ExitGears(engine.set_exit_settings, self.settings.exit, self.settings.adaptive,
                               self.settings.model.path)
        self._budget = Budget(k.max_poll_records)
        self._texts: Channel[Any] = Channel("texts")
        self._requests: Channel[Any] = Channel("requests")
        self._results: Channel[Any] = Channel("results", k.max_poll_records + self.settings.engine.max_slots)
        self._stages: dict[str, Any] = {}
        self._helpers: list[threading.Thread] = []

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
        """The engine loop in the calling thread (the other stages on their own) until ``stop``;
        raises the error that ended it."""
        self._running.set()
        limit_malloc_arenas()  # before the stage threads: docs in memory.py
        try:
            self._open()
            engine_stage = self._build_stages()
            for name in ("intake", "tokenizer", "output"):
                t = threading.Thread(target=self._guarded, args=(self._stages[name].run,),
                                     name=f"elbert-{name}-{self.replica_id}", daemon=True)
                self._helpers.append(t)
                t.start()
            engine_stage.run()
        except BaseException as e:
            self._fail(e)
        finally:
            self._finish()
            self._running.clear()
        if self.error is not None:
            raise self.error

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
        # ahead of Kafka work (a caller is waiting); refused once the pipeline is closing
        if not self._texts.put([job], urgent=True) or not self.alive():
            job.fail(EngineFailure(f"worker {self.replica_id} stopped"), None)
        return job.wait(timeout_s)

    # ---- composition --------------------------------------------------------------------------
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

    def _build_stages(self) -> EngineStage:
        assert self.source is not None and self.sink is not None  # set by _open
        deadline: Callable[[], float] = lambda: self._drain_deadline  # noqa: E731
        output = OutputStage(self.sink, self.tracker, self._results, self._loop, telemetry=self.telemetry,
                             model_name=self.model_name, model_version=self.model_version,
                             replica_id=self.replica_id, aborted=self._abort, deadline=deadline)
        self._stages = {
            "intake": Intake(self.settings.kafka, self.source, self.sink, self.tracker, self._budget,
                             self._texts, self._loop, stopping=self._stop, aborted=self._abort,
                             downstream_done=output.done, take_revoked=self._take_revoked, fail=self._fail),
            "tokenizer": TokenizeStage(self._batch_tokenizer(), self.tracker, self._budget, self._texts,
                                       self._requests, self._results, self._abort),
            "engine": EngineStage(self.engine, self.tracker, self._budget, self._requests, self._results,
                                  self._loop, self.gears, aborted=self._abort, stopping=self._stop,
                                  deadline=deadline),
            "output": output,
        }
        engine_stage: EngineStage = self._stages["engine"]
        return engine_stage

    def _batch_tokenizer(self) -> Callable[[list[str]], list[list[int]]]:
        """The tokenizer stage's batch call: ``tokenizer`` (``sync_jobs.batch_tokenizer``), else the
        engine's ``tokenize``."""
        if self.tokenizer is None:
            return self.engine.tokenize
        return batch_tokenizer(self.tokenizer, self.engine.max_length)

    def _guarded(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as e:  # noqa: BLE001 - recorded; every stage stops
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        """The first failure of any stage ends the worker: every stage aborts, nothing more is committed."""
        if self.error is None:
            self.error = e
            log.error("worker %s failed", self.replica_id, exc_info=e)
        self._abort.set()
        for ch in (self._texts, self._requests, self._results):
            ch.abort()

    def _finish(self) -> None:
        """After the engine loop: wait for the other stages (the intake closes sink and source; if it
        never ran, close them here) and fail the synchronous jobs left anywhere."""
        unasked = self.error is None and bool(self._stages) and not self._stop.is_set()
        if unasked:  # the engine's input ended without a stop: a stage failed (its error comes) or a bug
            self._abort.set()
            for ch in (self._texts, self._requests, self._results):
                ch.abort()
        for t in self._helpers:
            t.join(None if self.error is None and not unasked else JOIN_S)
            if t.is_alive():
                log.error("worker %s: stage %s did not end", self.replica_id, t.name)
        if unasked and self.error is None:
            self._fail(EngineFailure(f"worker {self.replica_id}: the engine loop ended unasked"))
        if not self._helpers:
            for closer in (self.sink, self.source):
                with contextlib.suppress(Exception):
                    if closer is not None:
                        closer.close()
        stopped = EngineFailure(f"worker {self.replica_id} stopped")
        engine_stage = self._stages.get("engine")
        refs = engine_stage.pending_jobs() if engine_stage is not None else []
        refs += [r.meta for r in self._requests.take_all() if isinstance(r.meta, SyncRef)]
        for job in [*(i for i in self._texts.take_all() if isinstance(i, SyncJob)), *(r.job for r in refs)]:
            job.fail(stopped, None)

    def _on_revoke(self, tps: set[TopicPartition]) -> None:
        """Called on the consumer's IO thread: record the set for the intake (parked records of these
        partitions are released there); each stage drops their work through the tracker's epochs."""
        with self._revoked_lock:
            self._revoked |= tps
        drop = getattr(self.sink, "drop", None)  # exactly_once: held results of these partitions
        if drop is not None:
            drop(tps)

    def _take_revoked(self) -> set[TopicPartition]:
        if not self._revoked:  # every intake iteration: usually nothing
            return set()
        with self._revoked_lock:
            tps, self._revoked = self._revoked, set()
        return tps

    # ---- stats ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters, rates and the autoscaler's inputs (see docs/streaming.md); cheap, any thread.
        ``backlog``: polled messages not yet queued in the engine; ``stages``: busy seconds, items and
        revoked work dropped per stage."""
        sink, source = self.sink, self.source
        counts: Counter[str] = sink.counts_snapshot() if sink is not None else Counter()
        out = self._loop.snapshot()
        failure, warnings = self.health()
        stages = {name: stage.clock.snapshot() for name, stage in self._stages.items()}
        since = source.rebalancing_since if source is not None else None  # read once: the IO thread sets it
        out.update(
            replica_id=self.replica_id, alive=self.alive(),
            error=None if self.error is None else repr(self.error),
            messages={o: counts.get(o, 0) for o in ("ok", "dead_letter", "error")},
            dead_letter_reasons={k.split(".", 1)[1]: v for k, v in counts.items()
                                 if k.startswith("dead_letter.")},
            backlog=self._budget.used, results_queued=len(self._results),
            paused=bool(source and source.paused),
            held_partitions=sorted(f"{t}[{p}]" for t, p in source.held) if source is not None else [],
            parked=sink.num_parked if sink is not None else 0,
            problems=[p for p in (failure, *warnings) if p],
            produce_in_flight=sink.in_flight if sink is not None else 0,
            pending_offsets=self.tracker.total_pending(),
            num_commits=source.num_commits if source is not None else 0,
            num_revocations=source.num_revocations if source is not None else 0,
            rebalancing_s=None if since is None else round(time.monotonic() - since, 3),
            num_dropped_revoked=sum(int(s["dropped_revoked"]) for s in stages.values()),
            stages=stages, exit_policy=self.settings.exit.model_dump(), adaptive=self.gears.describe(),
        )
        return out

    def telemetry_snapshot(self) -> Any:
        """The ``telemetry.StatsSnapshot`` read when metrics are collected."""
        return self._loop.telemetry_snapshot(self._budget.used, self.sink.num_parked if self.sink else 0,
                                             len(self.source.held) if self.source else 0, self.gears.gear)
