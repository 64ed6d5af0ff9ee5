"""The pipelined worker's stage logic without a broker: channels, the budget, the epoch filter, and
the tokenizer, engine and output stages driven with plain objects (a fake engine and a recording
sink: fakes of logic only; the real stages run against Tansu in tests/integration)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from elbert_stream.adaptive import UPDATE_EVERY_S, ExitGears, LoadSignals
from elbert_stream.config import AdaptiveSettings, ExitSettings
from elbert_stream.errors import BadMessage
from elbert_stream.stream.engine_stage import EngineStage
from elbert_stream.stream.loop_stats import LoopStats
from elbert_stream.stream.offsets import OffsetTracker
from elbert_stream.stream.output import OutputStage
from elbert_stream.stream.pipeline import Budget, Channel, DeadLetter, keep_current
from elbert_stream.stream.records import InputMessage, OutputRecord, encode_output, output_record
from elbert_stream.stream.sync_jobs import SyncJob, SyncRef, batch_tokenizer
from elbert_stream.stream.tokenizing import TokenizeStage
from elbert_stream.types import DepthTrace, EngineStats, Prediction, Request


def polled(tracker: OffsetTracker, partition: int, offset: int, value: bytes = b"text") -> InputMessage:
    epoch = tracker.track(("in", partition), offset)
    assert epoch is not None
    return InputMessage("in", partition, offset, key=b"k", value=value, headers=[], epoch=epoch)


def pred(meta: Any, i: int = 0) -> Prediction:
    return Prediction(request_id=f"r{i}", label="x", label_index=0, probabilities=[0.75, 0.25], exit_depth=2,
                      exit_reason="window", trace=[DepthTrace(1, 0, 0.6, 0.9), DepthTrace(2, 0, 0.75, 0.8)],
                      queue_s=0.001, compute_s=0.002, meta=meta)


# ---- channels, budget, epochs ---------------------------------------------------------------------
def test_channel_hands_over_batches_in_order_urgent_first_and_ends() -> None:
    ch: Channel[int] = Channel("c")
    assert ch.get() == [] and ch.put([1, 2]) and ch.put([3]) and ch.put([0], urgent=True)
    assert ch.get() == [0, 1, 2, 3] and len(ch) == 0
    ch.put([1])
    ch.put([7], urgent=True)
    assert ch.get_urgent() == [7] and ch.get_urgent() == [] and ch.get() == [1]
    ch.put([4])
    ch.close()
    assert not ch.put([5]), "a closed channel takes nothing more"
    assert ch.get() == [4], "a closed channel is drained first"
    assert ch.get() is None


def test_full_channel_blocks_the_producer_until_the_consumer_takes() -> None:
    ch: Channel[int] = Channel("c", capacity=2)
    assert ch.put([1, 2])
    assert not ch.put([3], timeout_s=0.05), "full: the put waits (and here times out)"
    assert ch.put([9], urgent=True), "urgent items ignore the bound"
    done = threading.Event()
    t = threading.Thread(target=lambda: (ch.put([3]), done.set()))
    t.start()
    assert not done.wait(0.1)
    assert ch.get() == [9, 1, 2]
    assert done.wait(5) and ch.get() == [3]
    t.join()


def test_abort_wakes_every_waiter() -> None:
    full: Channel[int] = Channel("full", capacity=1)
    full.put([1])
    empty: Channel[int] = Channel("empty")
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(full.put([2]))),
               threading.Thread(target=lambda: results.append(empty.get(30.0)))]
    for t in threads:
        t.start()
    time.sleep(0.05)
    full.abort()
    empty.abort()
    for t in threads:
        t.join(5)
    assert sorted(results, key=repr) == [False, None]


def test_budget_counts_and_wakes() -> None:
    b = Budget(3)
    b.take(3)
    assert b.available() == 0 and not b.wait_for_room(0.01)
    threading.Timer(0.05, lambda: b.give(2)).start()
    assert b.wait_for_room(5) and b.available() == 2 and b.used == 1


def test_keep_current_drops_revoked_epochs_once_per_partition() -> None:
    tracker = OffsetTracker()
    a, b = polled(tracker, 0, 1), polled(tracker, 1, 1)
    calls: list[tuple[str, int, int]] = []

    def is_current(*key: Any) -> bool:
        calls.append(key)
        return tracker.is_current(*key)

    before = tracker.num_forgets
    tracker.forget([("in", 0)])
    assert tracker.num_forgets == before + 1
    job = SyncJob(["t"])
    kept, dropped = keep_current([a, b, a, job], lambda m: m if isinstance(m, InputMessage) else None,
                                 is_current)
    assert kept == [b, job] and dropped == 2
    assert len(calls) == 2, "one lookup per (partition, epoch)"


# ---- the tokenizer stage --------------------------------------------------------------------------
def fake_tokenize(texts: list[str]) -> list[list[int]]:
    if any("\x00" in t for t in texts):
        raise ValueError("NUL")
    return [[101, len(t), 102] for t in texts]


def tokenize_stage(tracker: OffsetTracker, budget: Budget) -> tuple[TokenizeStage, Channel[Any], Channel[Any],
                                                                    Channel[Any]]:
    inbox, to_engine, to_output = Channel[Any]("texts"), Channel[Any]("requests"), Channel[Any]("results")
    return (TokenizeStage(fake_tokenize, tracker, budget, inbox, to_engine, to_output, threading.Event()),
            inbox, to_engine, to_output)


def test_tokenizer_stage_batches_forwards_dead_letters_and_drops_revoked_work() -> None:
    tracker, budget = OffsetTracker(), Budget(10)
    stage, inbox, to_engine, to_output = tokenize_stage(tracker, budget)
    ok, nul, undecodable, revoked = (polled(tracker, 0, 1), polled(tracker, 0, 2), polled(tracker, 0, 3),
                                     polled(tracker, 1, 1))
    budget.take(4)
    tracker.forget([("in", 1)])
    job = SyncJob(["sync text"])
    inbox.put([(ok, "hello"), (nul, "a\x00b"), DeadLetter(undecodable, BadMessage("empty", "blank")),
               (revoked, "late"), job])
    inbox.close()
    stage.run()
    reqs = to_engine.get()
    assert reqs is not None and [r.meta for r in reqs] == [SyncRef(job, 0), ok], "jobs go first"
    assert reqs[1].input_ids == [101, 5, 102] and reqs[1].arrival_s == ok.polled_s
    dead = to_output.get()
    assert dead is not None and sorted((d.msg.offset, d.error.reason) for d in dead) == [
        (2, "tokenizer_error"), (3, "empty")]
    assert stage.clock.dropped_revoked == 1
    assert budget.used == 1, "only the request on its way to the engine still counts"
    assert to_engine.get() is None, "the stage closes the engine's channel when its own ends"


# ---- the engine stage -----------------------------------------------------------------------------
class FakeEngine:
    """Queue of at most ``max_queue``; every step finishes everything queued (logic only)."""

    num_layers, model_name, model_version, max_length = 2, "fake", "0", 8

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.queue: list[Request] = []
        self.steps = 0

    def add(self, r: Request) -> bool:
        if not r.input_ids:
            raise BadMessage("empty", "no ids")
        if len(self.queue) >= self.max_queue:
            return False
        self.queue.append(r)
        return True

    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[Prediction]:
        self.steps += 1
        out, self.queue = [pred(r.meta, i) for i, r in enumerate(self.queue)], []
        return out

    def stats(self) -> EngineStats:
        return EngineStats(mode="continuous", max_slots=1, exit_depth_counts=[0, 0], busy_depth_counts=[0, 0])


def engine_stage(engine: FakeEngine, tracker: OffsetTracker, budget: Budget, out_capacity: int | None = None,
                 gears: ExitGears | None = None) -> tuple[EngineStage, Channel[Any], Channel[Any]]:
    inbox, out = Channel[Any]("requests"), Channel[Any]("results", out_capacity)
    gears = gears or ExitGears(lambda s: None, ExitSettings(), AdaptiveSettings(), None)  # adaptive off
    stage = EngineStage(engine, tracker, budget, inbox, out, LoopStats(2), gears, aborted=threading.Event(),
                        stopping=threading.Event(), deadline=lambda: float("inf"))
    return stage, inbox, out


def test_engine_stage_keeps_what_the_engine_cannot_queue_counted_in_the_budget() -> None:
    tracker, budget = OffsetTracker(), Budget(5)
    engine = FakeEngine(max_queue=2)
    stage, inbox, out = engine_stage(engine, tracker, budget)
    msgs = [polled(tracker, 0, i) for i in range(5)]
    budget.take(5)
    inbox.put([Request([1], meta=m) for m in msgs[:4]] + [Request([], meta=msgs[4])])
    assert stage.iteration()
    assert len(stage.backlog) == 3 and budget.used == 3, "2 queued in the engine, 3 wait here"
    first = out.get()
    assert first is not None and [p.meta.offset for p in first] == [0, 1]
    while stage.backlog or engine.has_work():
        stage.iteration()
    rest = out.get()
    assert rest is not None
    assert [type(i).__name__ for i in rest].count("DeadLetter") == 1, "add's BadMessage: a dead letter"
    assert budget.used == 0


def test_engine_stage_drops_waiting_work_of_a_revoked_partition() -> None:
    tracker, budget = OffsetTracker(), Budget(10)
    engine = FakeEngine(max_queue=1)
    stage, inbox, out = engine_stage(engine, tracker, budget)
    keep, gone = [polled(tracker, 0, i) for i in range(3)], [polled(tracker, 1, i) for i in range(3)]
    budget.take(6)
    inbox.put([Request([1], meta=m) for pair in zip(keep, gone, strict=True) for m in pair])
    stage.iteration()  # one queued in the engine, five wait
    tracker.forget([("in", 1)])
    while stage.backlog or engine.has_work():
        stage.iteration()
    got = [p for batch in iter(out.get, []) for p in batch]
    assert [(p.meta.partition, p.meta.offset) for p in got] == [(0, 0), (0, 1), (0, 2)], (
        "after the revoke nothing of in[1] ran")
    assert stage.clock.dropped_revoked == 3 and budget.used == 0


def test_engine_stage_answers_jobs_itself() -> None:
    tracker, budget = OffsetTracker(), Budget(10)
    stage, inbox, out = engine_stage(FakeEngine(max_queue=4), tracker, budget)
    job = SyncJob(["a"])
    budget.take(1)
    inbox.put([Request([1], meta=polled(tracker, 0, 0))])
    inbox.put([Request([1], meta=SyncRef(job, 0))], urgent=True)
    stage.iteration()
    assert job.wait(1)[0].meta == SyncRef(job, 0), "answered without the output stage"
    sent = out.get()
    assert sent is not None and [p.meta.offset for p in sent] == [0]


def test_engine_stage_waits_while_the_output_channel_is_full() -> None:
    tracker, budget = OffsetTracker(), Budget(10)
    engine = FakeEngine(max_queue=1)
    stage, inbox, out = engine_stage(engine, tracker, budget, out_capacity=1)
    budget.take(3)
    inbox.put([Request([1], meta=polled(tracker, 0, i)) for i in range(3)])
    inbox.close()
    t = threading.Thread(target=stage.run, daemon=True)
    t.start()
    time.sleep(0.2)
    assert engine.steps == 2, "one result in the channel, the second step's waits to be put"
    seen = []
    while (batch := out.get(1.0)) is not None:
        seen += [p.meta.offset for p in batch]
    t.join(5)
    assert seen == [0, 1, 2] and not t.is_alive()


# ---- the output stage -----------------------------------------------------------------------------
class RecordingSink:
    def __init__(self) -> None:
        self.outputs: list[tuple[InputMessage, bytes]] = []
        self.dead: list[tuple[InputMessage, str]] = []
        self.flushed = False

    def send_output(self, msg: InputMessage, value: bytes, headers: Any) -> None:
        self.outputs.append((msg, value))

    def send_dead_letter(self, msg: InputMessage, reason: str, detail: str, trace: Any = None) -> None:
        self.dead.append((msg, reason))

    def raise_failures(self) -> None:
        pass

    def retry_parked(self) -> int:
        return 0

    def flush(self, timeout_s: float | None = None) -> None:
        self.flushed = True


def test_output_stage_sends_answers_routes_jobs_and_drops_revoked() -> None:
    tracker = OffsetTracker()
    sink = RecordingSink()
    inbox: Channel[Any] = Channel("results")
    stage = OutputStage(sink, tracker, inbox, LoopStats(2), telemetry=None,  # type: ignore[arg-type]
                        model_name="m", model_version="1", replica_id="r0", aborted=threading.Event(),
                        deadline=lambda: float("inf"))
    live, bad, revoked = polled(tracker, 0, 5), polled(tracker, 0, 6), polled(tracker, 1, 1)
    tracker.forget([("in", 1)])
    job = SyncJob(["x"])
    inbox.put([pred(live), pred(SyncRef(job, 0)), DeadLetter(bad, BadMessage("empty", "blank")),
               pred(revoked), DeadLetter(revoked, BadMessage("empty", "blank"))])
    inbox.close()
    stage.run()
    assert [(m.offset, OutputRecord.from_bytes(v).exit_depth) for m, v in sink.outputs] == [(5, 2)]
    assert [(m.offset, r) for m, r in sink.dead] == [(6, "empty")]
    assert job.wait(1)[0].label == "x"
    assert stage.clock.dropped_revoked == 2 and sink.flushed and stage.done.is_set()


# ---- per-message codecs ---------------------------------------------------------------------------
def test_encode_output_is_the_output_record() -> None:
    msg = InputMessage("in", 3, 42, key=b"k\xff", value=b"v", headers=[], timestamp_ms=1000, id="doc-1")
    p = pred(msg)
    fast = OutputRecord.from_bytes(encode_output(msg, p, model_name="m", model_version="1", replica_id="r",
                                                 now_ms=5000, now_s=msg.polled_s + 0.5, gear=2))
    slow = output_record(msg, p, model_name="m", model_version="1", replica_id="r", now_ms=5000,
                         now_s=msg.polled_s + 0.5, gear=2)
    assert fast == slow
    assert list(fast.model_dump()) == list(OutputRecord.model_fields), "same fields, same order"
    none = InputMessage("in", 0, 1, key=None, value=b"v", headers=[])
    assert OutputRecord.from_bytes(encode_output(none, pred(none), model_name="m", model_version="1",
                                                 replica_id="r")).end_to_end_ms is None


@pytest.mark.parametrize("which", ["tiny", "shipped"])
def test_batch_tokenizer_matches_the_tokenizers_own_call(which: str) -> None:
    from tiny_elbert import tiny_tokenizer

    from elbert_stream.engine.model import load_tokenizer

    tok = tiny_tokenizer() if which == "tiny" else load_tokenizer(None)
    texts = ["market shares rose", "a goal in the match " * 40, "café ünïcode", " "]
    fast = batch_tokenizer(tok, 16)
    assert fast(texts) == [list(ids) for ids in tok(texts, truncation=True, max_length=16)["input_ids"]]
    assert tok("a goal in the match " * 40)["input_ids"][16:], "the tokenizer itself was not truncated"
    assert len(fast(texts)[1]) == 16


# ---- the exit gear travels with its step's predictions ---------------------------------------------
def test_predictions_carry_their_steps_gear_to_the_record_and_only_gear_0_feeds_the_exit_histogram() -> None:
    """The engine stage stamps each step's predictions with the gear in force for that step (shipped
    model's gears.json, controller driven by a fake clock); the output stage writes it into the record
    and counts looser-gear exits as finished but keeps them out of the autoscaler's histogram."""
    now, applied = [0.0], []
    adaptive = AdaptiveSettings(enabled=True, max_accuracy_loss_points=None)
    gears = ExitGears(applied.append, ExitSettings(), adaptive, None, clock=lambda: now[0])
    tracker, budget, engine = OffsetTracker(), Budget(10), FakeEngine(max_queue=10)
    stage, inbox, out = engine_stage(engine, tracker, budget, gears=gears)
    msgs = [polled(tracker, 0, i) for i in range(4)]
    budget.take(4)
    inbox.put([Request([1], meta=m) for m in msgs[:2]])
    stage.iteration()  # gear 0: calm signals, nothing waits
    burst = LoadSignals(queue_depth=10_000, consumer_lag=None, oldest_wait_s=60.0, output_rate_msgs_per_s=1.0)
    now[0] += UPDATE_EVERY_S
    gears.update(lambda: burst)
    assert gears.gear == 1 and applied[-1].tau == 0.4
    inbox.put([Request([1], meta=m) for m in msgs[2:]])
    now[0] += 0.01  # within UPDATE_EVERY_S: the stage's own update does not shift back
    stage.iteration()
    preds = [p for batch in iter(out.get, []) for p in batch]
    assert [(p.meta.offset, p.gear) for p in preds] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    sink, loop = RecordingSink(), LoopStats(2)
    output = OutputStage(sink, tracker, Channel("results"), loop, telemetry=None,  # type: ignore[arg-type]
                         model_name="m", model_version="1", replica_id="r0", aborted=threading.Event(),
                         deadline=lambda: float("inf"))
    output.emit(preds)
    assert [OutputRecord.from_bytes(v).gear for _, v in sink.outputs] == [0, 0, 1, 1]
    snap = loop.snapshot()
    assert snap["num_finished"] == 4 and sum(snap["recent_exit_depth_counts"]) == pytest.approx(2, rel=0.01)


class JoiningSource:
    """A consumer-owning source of logic only: every partition paused, a group join in flight for the
    first ``join_polls`` polls; records each poll's timeout and when it was made."""

    def __init__(self, join_polls: int) -> None:
        self.join_polls = join_polls
        self.polls: list[tuple[int, float]] = []
        self.paused = False
        self.consumer = type("C", (), {"assignment": staticmethod(lambda: set())})()

    @property
    def joining(self) -> bool:
        return len(self.polls) < self.join_polls

    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[InputMessage]:
        self.polls.append((timeout_ms, time.monotonic()))
        return []

    def hold(self, tps: Any) -> None: ...
    def pause(self) -> None: self.paused = True
    def resume(self) -> None: self.paused = False
    def lag(self) -> dict[Any, Any]: return {}
    def total_partitions(self) -> int: return 4


def test_a_paused_intake_polls_back_to_back_while_a_join_is_in_flight() -> None:
    """Budget spent: the intake waits for room between ``poll(0)`` calls, except while the group join
    is in flight, when it polls with a real timeout and no wait (kafka-python drops a join answered
    between two polls: ``kafka_internals.joining_group``)."""
    from elbert_stream.config import KafkaSettings
    from elbert_stream.stream.intake import Intake

    settings = KafkaSettings(poll_timeout_ms=300)
    source = JoiningSource(join_polls=3)
    sink = type("S", (), {"blocked": lambda self: set(), "commit": lambda self, *a, **k: None})()
    budget = Budget(2)
    budget.take(2)  # full: nothing may be polled
    intake = Intake(settings, source, sink, OffsetTracker(), budget, Channel(4), LoopStats(4),  # type: ignore[arg-type]
                    stopping=threading.Event(), aborted=threading.Event(), downstream_done=threading.Event(),
                    take_revoked=set, fail=lambda e: None)
    t0 = time.monotonic()
    for _ in range(5):
        intake.iteration()
    assert source.paused
    assert [t for t, _ in source.polls] == [300, 300, 300, 0, 0], source.polls
    joined_at = [at - t0 for _, at in source.polls]
    assert joined_at[2] < 0.2, "no wait for room between the polls of a join"
    assert joined_at[3] - joined_at[2] >= 0.25 and joined_at[4] - joined_at[3] >= 0.25, \
        "joined: the intake waits for room (poll_timeout_ms) between polls"
