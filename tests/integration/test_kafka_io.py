"""KafkaSource / KafkaSink against a real Tansu broker, and the Tansu facts the worker relies on
(printed as ``[tansu] ...`` lines; docs/streaming.md quotes them)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer
from kafka import TopicPartition as KTopicPartition
from kafka_support import allow_values_of, produce, read_all, wait_for

from elbert_stream.config import KafkaSettings
from elbert_stream.stream.offsets import CommitCadence, OffsetTracker, TopicPartition
from elbert_stream.stream.records import InputMessage, output_record
from elbert_stream.stream.sink import DeliveryError, KafkaSink
from elbert_stream.stream.source import KafkaSource, join_bound_s
from elbert_stream.testing.broker import EmbeddedBroker, NoidaBroker, broker_name, create_topics, quirks_of
from elbert_stream.types import DepthTrace, Prediction

pytestmark = pytest.mark.integration


def kafka_settings(bootstrap: str, topics: dict[str, str], **extra: object) -> KafkaSettings:
    return KafkaSettings.model_validate({
        "bootstrap_servers": bootstrap, "input_topics": [topics["input"]], "output_topic": topics["output"],
        "dead_letter_topic": topics["dead"], "group_id": topics["group"], "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000, **extra})


def poll_until(source: KafkaSource, n: int, timeout_s: float = 30.0) -> list[InputMessage]:
    got: list[InputMessage] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += source.poll(200)
    return got


def group_offsets(bootstrap: str, group: str, tps: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    """The group's committed offsets of ``tps``, read by a fresh consumer."""
    check = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {tp: check.committed(KTopicPartition(*tp)) for tp in tps}
    finally:
        check.close(autocommit=False)


def prediction(num_labels: int = 5) -> Prediction:
    probs = [1.0 / num_labels] * num_labels
    return Prediction(request_id="r", label="x", label_index=0, probabilities=probs, exit_depth=1,
                      exit_reason="max_depth", trace=[DepthTrace(1, 0, probs[0], 1.0)], queue_s=0.0,
                      compute_s=0.0)


def test_group_join_static_rejoin_and_lag(kafka_bootstrap: str, topics: dict[str, str]) -> None:
    items = [(f"k{i}".encode(), f"m{i}".encode(), {}) for i in range(40)]
    sent = produce(kafka_bootstrap, topics["input"], items)
    settings = kafka_settings(kafka_bootstrap, topics, group_instance_id="inst-0", max_poll_records=5,
                              leave_group_on_close=False, lag_from="fetch_high_watermark")
    t0 = time.monotonic()
    source = KafkaSource(settings, OffsetTracker())
    bound_s = join_bound_s(settings.session_timeout_ms)  # the health check's (stuck_joining)
    first = poll_until(source, 1, timeout_s=bound_s)
    join_s = time.monotonic() - t0
    assert first and source.assignment() == {TopicPartition(topics["input"], p) for p in range(4)}
    # lag: from the fetch high watermark, exact; None only before a fetch answered
    ends = {p: 1 + max((r.offset for r in sent if r.partition == p), default=-1) for p in range(4)}
    lag = source.lag()
    for tp, value in lag.items():
        position = source.consumer.position(next(t for t in source.consumer.assignment()
                                                  if (t.topic, t.partition) == tp))
        assert value is None or value == ends[tp.partition] - position, (tp, value, ends, position)
    assert sum(v is not None for v in lag.values()) >= 1
    raw_ends = source.consumer.end_offsets(list(source.consumer.assignment()))
    source.close()
    t1 = time.monotonic()
    again = KafkaSource(settings, OffsetTracker())  # same static member, it did not leave: no rebalance
    assert poll_until(again, 1, timeout_s=bound_s)
    rejoin_s = time.monotonic() - t1
    again.close()
    raw = sorted((t.partition, o) for t, o in raw_ends.items())
    print(f"[tansu] join {join_s:.1f}s, static rejoin {rejoin_s:.1f}s, lag {dict(lag)}, "
          f"end_offsets {raw} vs true {sorted(ends.items())}")
    # a join slower than this fails the worker's health check (KafkaSource.stuck_joining)
    assert join_s < bound_s


@pytest.mark.both_brokers
def test_pause_stops_fetching_until_resume(kafka_bootstrap: str, topics: dict[str, str]) -> None:
    produce(kafka_bootstrap, topics["input"], [(None, f"a{i}".encode(), {}) for i in range(8)])
    source = KafkaSource(kafka_settings(kafka_bootstrap, topics), OffsetTracker())
    try:
        assert len(poll_until(source, 8)) == 8
        source.pause()
        produce(kafka_bootstrap, topics["input"], [(None, f"b{i}".encode(), {}) for i in range(8)])
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert source.poll(100) == []
        source.resume()
        assert len(poll_until(source, 8)) == 8
    finally:
        source.close()


def test_sink_acks_advance_commits_and_rejected_output_is_dead_lettered(
        kafka_bootstrap: str, topics: dict[str, str]) -> None:
    settings = kafka_settings(kafka_bootstrap, topics)
    tracker = OffsetTracker()
    tp = (topics["input"], 0)
    msgs = [InputMessage(topics["input"], 0, off, f"k{off}".encode(), b"v", [("traceparent", b"00-t-s-01")],
                         epoch=tracker.track(tp, off) or 0) for off in range(3)]
    sink = KafkaSink(settings, tracker, replica_id="r9", max_request_size=1200)
    big = output_record(msgs[2], prediction(num_labels=200), model_name="m", model_version="1",
                        replica_id="r9")
    assert len(big.to_bytes()) > 1200
    sink.send_dead_letter(msgs[1], "empty", "nothing there")
    sink.send_output(msgs[2], big)  # too large for this producer: becomes a dead letter
    sink.flush(10)
    sink.raise_failures()
    assert tracker.committable() == {}  # offset 0 not answered yet: nothing may be committed
    sink.send_output(msgs[0], output_record(msgs[0], prediction(), model_name="m", model_version="1",
                                            replica_id="r9"))
    sink.flush(10)
    sink.close()
    assert tracker.committable() == {TopicPartition(*tp): 3}
    got = read_all(kafka_bootstrap, [topics["output"], topics["dead"]], 3)
    dead = {int(r.headers["elbert.source.offset"]): r for r in got[topics["dead"]]}
    assert sorted(dead) == [1, 2] and dead[2].headers["elbert.reason"] == b"output_rejected"
    assert dead[1].key == b"k1" and dead[1].value == b"v" and dead[1].headers["traceparent"] == b"00-t-s-01"
    (out,) = got[topics["output"]]
    assert out.key == b"k0" and out.headers == {"traceparent": b"00-t-s-01"}
    assert sink.counts["ok"] == 1 and sink.counts["dead_letter"] == 2


def test_undeliverable_output_is_fatal_and_never_committed(tmp_path: object) -> None:
    with EmbeddedBroker() as broker:
        names = {"input": "in", "output": "out", "dead": "dlq", "group": "g"}
        broker.create_topics(["in", "out", "dlq"], 1)
        tracker = OffsetTracker()
        msg = InputMessage("in", 0, 0, None, b"v", [], epoch=tracker.track(("in", 0), 0) or 0)
        settings = kafka_settings(broker.bootstrap, names, delivery_timeout_ms=3000)
        sink = KafkaSink(settings, tracker, replica_id="r", request_timeout_ms=1000, retry_backoff_ms=100,
                         reconnect_backoff_max_ms=200)
        sink.producer.send("out", b"warm-up").get(10)  # producer id obtained while the broker was up
        broker.stop()  # the broker is gone before the output is delivered
        rec = output_record(msg, prediction(), model_name="m", model_version="1", replica_id="r")
        sink.send_output(msg, rec)
        assert wait_for(lambda: sink.in_flight == 0, 20)
        with pytest.raises(DeliveryError, match=r"in\[0\]@0"):
            sink.raise_failures()
        assert tracker.committable() == {} and sink.counts["error"] == 1
        sink.close(1)


@pytest.mark.both_brokers
def test_commit_only_finished_offsets_on_interval(kafka_bootstrap: str, topics: dict[str, str]) -> None:
    """The cadence holds commits until the interval passed (or forced); the sink then commits the
    contiguous finished run per partition."""
    produce(kafka_bootstrap, topics["input"], [(None, f"c{i}".encode(), {}) for i in range(12)])
    tracker = OffsetTracker()
    settings = kafka_settings(kafka_bootstrap, topics, commit_interval_s=3600)
    source = KafkaSource(settings, tracker)
    sink = KafkaSink(settings, tracker, replica_id="t")
    cadence = CommitCadence(settings.commit_interval_s)
    try:
        msgs = poll_until(source, 12)
        for m in msgs:
            if m.offset != 1:  # offset 1 of every partition stays unfinished
                tracker.done((m.topic, m.partition), m.offset, m.epoch)
        assert not cadence.due()  # interval not reached
        assert cadence.due(force=True)
        done = sink.commit(source, blocking=True)
    finally:
        sink.close(1)
        source.close()
    want = {}
    for p in {m.partition for m in msgs}:
        offsets = sorted(m.offset for m in msgs if m.partition == p)
        want[TopicPartition(topics["input"], p)] = 1 if 1 in offsets else offsets[-1] + 1
    assert done == want
    assert group_offsets(kafka_bootstrap, topics["group"], want) == want


def test_dead_letter_of_an_oversized_value_omits_the_value(kafka_bootstrap: str,
                                                           topics: dict[str, str]) -> None:
    tracker = OffsetTracker()
    huge = b"z" * 1_500_000  # over the producer's 1 MiB max_request_size: cannot be produced again
    epoch = tracker.track((topics["input"], 0), 0) or 0
    msg = InputMessage(topics["input"], 0, 0, b"key", huge, [], epoch=epoch)
    sink = KafkaSink(kafka_settings(kafka_bootstrap, topics), tracker, replica_id="r")
    sink.send_dead_letter(msg, "too_large", "value is 1500000 bytes")
    sink.flush(10)
    sink.raise_failures()
    sink.close()
    (dead,) = read_all(kafka_bootstrap, [topics["dead"]], 1)[topics["dead"]]
    assert dead.value is None and dead.key == b"key"
    assert dead.headers["elbert.value_omitted"] == b"1500000 bytes"
    assert dead.headers["elbert.reason"] == b"too_large"
    assert tracker.committable() == {TopicPartition(topics["input"], 0): 1}


def fresh_topics(bootstrap: str, stem: str, partitions: int = 4) -> dict[str, str]:
    stem = f"{stem}-{time.monotonic_ns() % 10**9}"
    names = {"input": f"{stem}-in", "output": f"{stem}-out", "dead": f"{stem}-dlq", "group": f"{stem}-g"}
    create_topics(bootstrap, [names["input"], names["output"], names["dead"]], partitions)
    return names


@pytest.mark.parametrize("kind", [EmbeddedBroker, NoidaBroker])
def test_an_embedded_broker_leaves_no_process_behind(kind: type[EmbeddedBroker]) -> None:
    import os

    with kind() as broker:
        pid = broker._proc.pid  # type: ignore[union-attr]
        create_topics(broker.bootstrap, ["t"], 1)
    assert not broker.alive()
    with pytest.raises(ProcessLookupError):  # reaped: the broker itself, not a wrapper around it
        os.kill(pid, 0)
    time.sleep(0.2)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", broker.port), timeout=1).close()


@pytest.mark.both_brokers
def test_a_member_busy_between_polls_still_joins(kafka_bootstrap: str) -> None:
    """The worker polls with timeout 0 while the engine is busy. kafka-python 3.0 drops a join whose
    answer arrives between two polls (``kafka_internals.joining_group``): a bare consumer doing this
    never gets an assignment. ``KafkaSource.poll`` waits for a pending join, so it does."""
    bootstrap = kafka_bootstrap
    topics = fresh_topics(bootstrap, "busyjoin")
    source = KafkaSource(kafka_settings(bootstrap, topics), OffsetTracker())
    polls = 0
    try:
        deadline = time.monotonic() + 30
        while not source.assignment() and time.monotonic() < deadline:
            source.poll(0)
            polls += 1
            time.sleep(0.05)  # an engine step between polls
        assert len(source.assignment()) == 4, f"no assignment after {polls} polls"
        assert source.rebalancing_since is None and source.stuck_joining() is None
    finally:
        source.close()
    print(f"[{broker_name(bootstrap)}] busy member joined after {polls} polls")


@pytest.mark.both_brokers
def test_periodic_commit_is_asynchronous_and_lands(kafka_bootstrap: str, topics: dict[str, str]) -> None:
    """The loop's commit sends and returns (a coordinator that does not answer never blocks it); the
    answer is taken on a later poll; at most one commit is in flight."""
    produce(kafka_bootstrap, topics["input"], [(None, f"a{i}".encode(), {}) for i in range(8)])
    tracker = OffsetTracker()
    source = KafkaSource(kafka_settings(kafka_bootstrap, topics), tracker)
    try:
        for m in poll_until(source, 8):
            tracker.done((m.topic, m.partition), m.offset, m.epoch)
        offsets = tracker.committable()
        assert source.commit(offsets) == offsets and source.num_commits == 0  # sent, not answered yet
        assert source.commit(offsets) == {}  # one in flight at a time
        assert wait_for(lambda: source.poll(10) == [] and source.num_commits == 1, 20)
        assert tracker.committable() == {}  # recorded as committed
    finally:
        source.close()
    assert group_offsets(kafka_bootstrap, topics["group"], offsets) == offsets


def _cli(args: list[str], bootstrap: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elbert_stream.cli", *args, "--bootstrap", bootstrap],
                          input=stdin, capture_output=True, text=True, timeout=60, check=True)


def test_produce_and_consume_cli(kafka_bootstrap: str, topics: dict[str, str], tmp_path: Path) -> None:
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"text": "first", "id": 1}\n\n{"text": "second"}\n', encoding="utf-8")
    _cli(["produce", str(lines), "--json", "--key", "doc-{n}", "--topic", topics["input"]], kafka_bootstrap)
    _cli(["produce", "-", "--topic", topics["input"]], kafka_bootstrap, stdin="plain text line\n")
    got = read_all(kafka_bootstrap, [topics["input"]], 3)[topics["input"]]
    want = {b"plain text line": None, b'{"text": "first", "id": 1}': b"doc-0",
            b'{"text": "second"}': b"doc-2"}
    assert {r.value: r.key for r in got} == want
    msg = InputMessage(topics["input"], 0, 7, b"k", b"v", [])
    rec = output_record(msg, prediction(), model_name="m", model_version="1", replica_id="r")
    produce(kafka_bootstrap, topics["output"], [(b"k", rec.to_bytes(), {})])
    produce(kafka_bootstrap, topics["dead"], [(b"k", b"\xff", {"elbert.reason": b"not_utf8"})])
    out = _cli(["consume", "--topic", topics["output"], "--max", "1", "--timeout", "20"], kafka_bootstrap)
    (line,) = out.stdout.splitlines()
    assert json.loads(line)["record"] == json.loads(rec.to_bytes())
    dead = _cli(["consume", "--dead-letters", "--topic", topics["dead"], "--max", "1", "--timeout", "20"],
                kafka_bootstrap)
    row = json.loads(dead.stdout)
    assert row["headers"] == {"elbert.reason": "not_utf8"} and row["value"] == "\\xff"


class Polling:
    """A ``KafkaSource`` polled back to back on its own thread (as a worker does) until ``stop``; the
    test reads what the loop last saw (``assigned``, ``joined``, ``revocations``), never the consumer."""

    def __init__(self, source: KafkaSource) -> None:
        self.source = source
        self.assigned = 0
        self.joined = False
        self.revocations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.source.poll(100)
            self.assigned = len(self.source.assignment())
            self.joined = self.source.rebalancing_since is None
            self.revocations = self.source.num_revocations

    def stop(self, close: bool = True) -> None:
        self._stop.set()
        self._thread.join(30)
        if close:
            self.source.close()


def settled(members: list[Polling], quiet_s: float, timeout_s: float) -> bool:
    """True once no member saw a rebalance for ``quiet_s`` (Tansu wedges a group on a LeaveGroup
    during a join: quirk ``leave_during_join_wedges_group``)."""
    deadline = time.monotonic() + timeout_s
    last, since = [m.revocations for m in members], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = [m.revocations for m in members]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s and all(m.joined for m in members):
            return True
    return False


@pytest.mark.both_brokers
def test_a_static_member_stopping_cleanly_leaves_and_the_group_rebalances_at_once(
        kafka_bootstrap: str) -> None:
    """``leave_group_on_close`` (the default): a static member's clean close sends LeaveGroup with its
    instance id, so the survivor takes its partitions in about one rebalance, not after the session
    timeout (Kafka) or never (Tansu and noida-db never expire a departed static member)."""
    bootstrap = kafka_bootstrap
    topics = fresh_topics(bootstrap, "leave")
    # a long session timeout tells a LeaveGroup's rebalance from a session expiry (and from Tansu's
    # own 3 s + 3 s join delays)
    settings = [kafka_settings(bootstrap, topics, group_instance_id=f"leave-{i}", session_timeout_ms=30_000)
                for i in (0, 1)]
    a, b = (Polling(KafkaSource(s, OffsetTracker())) for s in settings)
    try:
        assert wait_for(lambda: a.assigned == b.assigned == 2, 90), f"split {a.assigned}, {b.assigned}"
        assert settled([a, b], 3.0, 60), "the group kept rebalancing"
        t0 = time.monotonic()
        b.stop()
        took_all = wait_for(lambda: a.assigned == 4 and a.joined, settings[0].session_timeout_ms / 1000 + 30)
        rebalance_s = time.monotonic() - t0
    finally:
        a.stop()
        b.stop()
    assert took_all, f"the survivor holds {a.assigned} partitions after the other left"
    print(f"[{broker_name(bootstrap)}] static member left: the survivor had all partitions "
          f"{rebalance_s:.1f}s later (session timeout {settings[0].session_timeout_ms / 1000:.0f}s)")
    # where departed static members are never expired (Tansu, noida-db) took_all alone proves the leave;
    # on a broker without Tansu's slow rebalances it is also faster than a session expiry
    if "slow_rebalance" not in quirks_of(bootstrap):
        assert rebalance_s < settings[0].session_timeout_ms / 1000, "no faster than a session expiry"


def true_ends(bootstrap: str, topic: str, partitions: int = 4) -> dict[int, int]:
    """Each partition's end offset, counted by reading the partition (no ListOffsets)."""
    got = read_all(bootstrap, [topic], 0, settle_s=1.0)[topic]
    return {p: 1 + max((r.offset for r in got if r.partition == p), default=-1) for p in range(partitions)}


@pytest.mark.both_brokers
def test_lag_from_list_offsets_is_exact_and_fresh_while_paused(kafka_bootstrap: str,
                                                               topics: dict[str, str]) -> None:
    """``lag_from=list_offsets`` (the default): lag = end offset (ListOffsets, read_committed) -
    position, exact, and it keeps growing while the member is paused (the fetch high watermark does
    not: no fetches). On a broker with the ``list_offsets_wrong`` quirk, the embedded broker's
    ``product_settings`` select the high watermark (that test: ``test_tansu_list_offsets_quirk``)."""
    if "list_offsets_wrong" in quirks_of(kafka_bootstrap):
        pytest.skip("this broker's ListOffsets is wrong (quirk list_offsets_wrong): "
                    "test_tansu_list_offsets_quirk shows it; workers there use the high watermark")
    produce(kafka_bootstrap, topics["input"], [(f"k{i}".encode(), b"m", {}) for i in range(40)])
    source = KafkaSource(kafka_settings(kafka_bootstrap, topics, max_poll_records=5), OffsetTracker())
    try:
        assert poll_until(source, 5)
        source.pause()
        produce(kafka_bootstrap, topics["input"], [(f"j{i}".encode(), b"m", {}) for i in range(40)])
        ends = true_ends(kafka_bootstrap, topics["input"])

        def exact() -> bool:
            lag = source.lag()
            pos = {t.partition: source.consumer.position(t) for t in source.consumer.assignment()}
            return len(lag) == 4 and all(v == ends[tp.partition] - pos[tp.partition] for tp, v in lag.items())

        assert wait_for(exact, 20), (source.lag(), ends)
        assert sum(v or 0 for v in source.lag().values()) > 40  # the second batch, produced while paused
    finally:
        source.close()


@pytest.mark.both_brokers
def test_a_fetch_brings_one_oversized_batch(kafka_bootstrap: str) -> None:
    """Kafka's fetch limits: a batch larger than ``max.partition.fetch.bytes`` comes whole, but alone
    in its fetch, which bounds a replica's consumer buffer by ``fetch_max_bytes`` or the largest batch
    (docs/streaming.md, "Memory"). noida-db returns every batch available (quirk
    ``fetch_limits_ignored``): asserted, so that the quirk is dropped once it is fixed."""
    topics = fresh_topics(kafka_bootstrap, "fetchlimit", partitions=1)
    allow_values_of(kafka_bootstrap, topics["input"], 3_000_000)
    produce(kafka_bootstrap, topics["input"], [(b"k", b"x" * 2_000_000, {}) for _ in range(4)], partition=0,
            max_request_size=3_000_000)  # four batches of one 2 MB record each
    tp = KTopicPartition(topics["input"], 0)
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_bytes=1 << 20,
                             max_partition_fetch_bytes=1 << 20)
    try:
        consumer.assign([tp])
        first: list[object] = []
        assert wait_for(lambda: first.extend(consumer.poll(200, max_records=100).get(tp, [])) or first, 30)
    finally:
        consumer.close()
    if "fetch_limits_ignored" in quirks_of(kafka_bootstrap):
        assert len(first) == 4, "noida-db now honours the fetch limits: drop the quirk fetch_limits_ignored"
    else:
        assert len(first) == 1, f"one fetch brought {len(first)} batches over the fetch limits"


def test_tansu_list_offsets_quirk(tansu_bootstrap: str) -> None:
    """Tansu 0.6: ListOffsets answers the last batch's base offset + 1, wrong when that batch holds
    more than one record (quirk ``list_offsets_wrong``; Kafka and noida-db answer the end offset).
    Fails when a Tansu release fixes it: then drop the quirk and its workaround (``lag_from``)."""
    if "list_offsets_wrong" not in quirks_of(tansu_bootstrap):
        pytest.skip("not the embedded Tansu broker")
    topics = fresh_topics(tansu_bootstrap, "listoffsets", partitions=1)
    produce(tansu_bootstrap, topics["input"], [(None, f"m{i}".encode(), {}) for i in range(10)], partition=0,
            linger_ms=500)  # one batch of 10
    probe = KafkaConsumer(bootstrap_servers=tansu_bootstrap, group_id=None, enable_auto_commit=False)
    try:
        ends = probe.end_offsets([KTopicPartition(topics["input"], 0)])
    finally:
        probe.close()
    truth = true_ends(tansu_bootstrap, topics["input"], 1)[0]
    assert truth == 10
    assert list(ends.values())[0] != truth, "Tansu's ListOffsets is now right: drop the quirk"
