"""Hostile and odd input through a real worker on a real broker: every offset gets exactly one answer
(an output, or a dead letter with the expected reason), the worker never crashes, memory stays
bounded with 10 MB values, and batches compressed by another client (gzip, snappy, lz4, zstd) decode."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kafka_support import (
    Reader,
    allow_values_of,
    by_source,
    produce,
    read_all,
    rss_mb,
    run_cli,
    wait_for,
    worker_settings,
)

from elbert_stream.engine.engine import Engine
from elbert_stream.errors import BadMessage
from elbert_stream.stream.records import OutputRecord, decode_input
from elbert_stream.stream.worker import Worker
from elbert_stream.testing.broker import create_topics, quirks_of

pytestmark = pytest.mark.integration
BIG = 10_000_000
NUM_BIG = int(os.environ.get("HOSTILE_NUM_BIG", "20"))  # two rounds' worth: NUM_BIG // 2 + 1 values a round
ROUNDS = 4
GARBAGE_HEADERS = {"traceparent": b"\xff\xfe not-a-trace", "tracestate": b"", "x-bin": bytes(range(256))}


def hostile_items() -> list[tuple[bytes | None, bytes | None, dict[str, bytes], str]]:
    """(key, value, headers, expected): expected is "out" or a dead-letter reason."""
    bomb = b'{"text": "deep", "a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    wide = b'{"text": "wide shares story", "a": [' + b"1," * 200_000 + b"1]}"
    return [
        (b"latin1", b"caf\xe9 \xff", {}, "not_utf8"),
        (b"empty", b"", {}, "empty"),
        (b"null", None, {}, "null_value"),
        (b"schema", json.dumps({"body": "no text field", "id": 1}).encode(), {}, "no_text"),
        (b"schema2", b'{"text": 5}', {}, "no_text"),
        (b"extra", json.dumps({"text": "the film", "id": "e1", "extra": {"n": [1, 2]}}).encode(), {}, "out"),
        (b"bomb", bomb, {}, "bad_json"),
        (b"wide", wide, {}, "out"),
        (b"surrogate", b'{"text": "x", "id": "\\ud800"}', {}, "not_utf8"),
        (b"long", b"word " * 20_000, {}, "out"),  # 100 000 chars = max_text_chars: truncated to tokens
        (b"longer", b"word " * 20_001, {}, "text_too_long"),
        (b"ctrl", "\x00\x07\x1b[31m red \u202e \u0645\u0631\u062d\u0628\u0627 \u200f".encode(), {}, "out"),
        (b"headers", b"garbage headers", GARBAGE_HEADERS, "out"),
        (b"\xff\x00key", b"a binary key", {}, "out"),
    ]


def settled_rss_mb(pid: int, span_s: float = 1.5) -> float:
    """The lowest RSS of ``pid`` over ``span_s`` (what it keeps, not what it is freeing right now)."""
    lowest = rss_mb(pid, "VmRSS")
    deadline = time.monotonic() + span_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        lowest = min(lowest, rss_mb(pid, "VmRSS"))
    return lowest


def check_answers(sent: list[Any], expected: list[str], got: dict[str, list[Any]]) -> dict[str, Any]:
    """Exactly one answer per sent offset, of the expected kind; returns the answers by position."""
    index = by_source({"out": got["out"], "dead": got["dead"]})
    assert sorted(index) == sorted(r.position for r in sent), "an offset got no answer (or a stray one)"
    assert all(len(v) == 1 for v in index.values()), {p: len(v) for p, v in index.items() if len(v) > 1}
    for rec, want in zip(sent, expected, strict=True):
        kind, ans = index[rec.position][0]
        reason = "out" if kind == "out" else ans.headers["elbert.reason"].decode()
        assert reason == want, (rec.key, reason, want, ans.headers.get("elbert.detail"))
        assert ans.key == rec.key
        if kind == "out":
            OutputRecord.from_bytes(ans.value)
    return {pos: v[0] for pos, v in index.items()}


@pytest.mark.both_brokers
def test_hostile_values_compressed_batches_and_10mb_values(kafka_bootstrap: str, topics: dict[str, str],
                                                            tiny_model_dir: Path, tmp_path: Path) -> None:
    """One ``elbert-stream run``: odd values, batches from gzip/snappy/lz4/zstd producers, then rounds of
    10 MB values; memory stays bounded and nothing of the values stays behind.

    - retained: the RSS once a round is answered and the intake's trim ran (the lowest of 1.5 s of
      samples: a buffer freed a moment later is not retained) must not grow from the second round to
      the last two by half a round (values kept, or growing fragmentation, would show in every round;
      one round more on noida-db, whose single fetch response kafka-python may still hold);
    - peak: at most three rounds' worth above the start (a few of the largest records at once, as
      each fetch brings one; docs/streaming.md "Hostile input"). On noida-db, which ignores fetch
      limits (quirk ``fetch_limits_ignored``), one fetch brings the whole backlog: six rounds' worth.
    The peak is a running maximum, so its growth over rounds is not what is checked."""
    settings = worker_settings(kafka_bootstrap, topics, tiny_model_dir)
    allow_values_of(kafka_bootstrap, topics["input"], BIG + 100_000)
    items = hostile_items()
    sent = produce(kafka_bootstrap, topics["input"], [(k, v, h) for k, v, h, _ in items])
    expected = [e for *_, e in items]
    for codec in ("gzip", "snappy", "lz4", "zstd"):
        batch = [(f"{codec}-{i}".encode(), f"{codec} story {i} about shares".encode(), {}) for i in range(25)]
        sent += produce(kafka_bootstrap, topics["input"], batch, compression_type=codec, linger_ms=50)
        expected += ["out"] * len(batch)
    proc = run_cli(settings, "hostile", tmp_path / "w.log")
    reader = Reader(kafka_bootstrap, [topics["output"], topics["dead"]])
    try:
        got = reader.read(len(sent), timeout_s=90, settle_s=0.5)
        # rounds of 10 MB values on one key (one partition) plus a keyless one
        peaks, kept, big = [rss_mb(proc.pid, "VmHWM")], [settled_rss_mb(proc.pid)], []
        for _round in range(ROUNDS):
            bigs = [(b"big", b"x" * BIG, {}) for _ in range(NUM_BIG // 2)] + [(None, b"y" * BIG, {})]
            big += produce(kafka_bootstrap, topics["input"], bigs, max_request_size=BIG + 100_000)
            got = reader.read(len(sent) + len(big), timeout_s=90, settle_s=1.0)  # the trim settles first
            peaks.append(rss_mb(proc.pid, "VmHWM"))
            kept.append(settled_rss_mb(proc.pid))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "w.log").read_text()[-3000:]
    finally:
        reader.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    answers = check_answers(sent + big, expected + ["too_large"] * len(big),
                            {"out": got[topics["output"]], "dead": got[topics["dead"]]})
    for rec in big:  # the value is omitted (null; empty when the key is null too: Kafka needs one)
        _, dead = answers[rec.position]
        assert dead.value == (None if rec.key else b"")
        assert dead.headers["elbert.value_omitted"] == f"{BIG} bytes".encode()
    extra = answers[sent[5].position][1]
    assert OutputRecord.from_bytes(extra.value).id == "e1"
    assert answers[sent[12].position][1].headers["traceparent"] == GARBAGE_HEADERS["traceparent"]
    per_round_mb = (NUM_BIG // 2 + 1) * BIG / 1e6
    print(f"[hostile] {len(sent)} odd/compressed, then {ROUNDS} rounds of {NUM_BIG // 2 + 1} x 10 MB "
          f"({per_round_mb:.0f} MB each): worker peak RSS {' -> '.join(f'{p:.0f}' for p in peaks)} MB, "
          f"RSS after each {' -> '.join(f'{p:.0f}' for p in kept)} MB")
    # the lower of the last two: kafka-python keeps its last socket read (up to one fetch response)
    # until more bytes arrive, which lifts a single sample; a leak lifts both. On noida-db that read
    # can be a whole round (quirk fetch_limits_ignored: kept 449 -> 611 -> 573 -> 573 -> 583 MB), so one
    # round more is allowed there; keeping every value still fails it (+330 MB over these rounds)
    whole_backlog = "fetch_limits_ignored" in quirks_of(kafka_bootstrap)
    allowed_mb = (1.5 if whole_backlog else 0.5) * per_round_mb
    assert min(kept[-2:]) - kept[1] < allowed_mb, "memory retained grew with the input"
    rounds_at_once = 6 if whole_backlog else 3
    assert peaks[-1] - peaks[0] < rounds_at_once * per_round_mb, "peak memory beyond a few rounds at once"

values = st.one_of(
    st.none(), st.binary(max_size=64), st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(lambda t, i, x: json.dumps({"text": t, "id": i, "x": x}).encode(),
              st.text(max_size=40), st.none() | st.integers() | st.text(max_size=8),
              st.recursive(st.none() | st.integers(), lambda s: st.lists(s, max_size=3), max_leaves=8)),
)


@settings(max_examples=1, deadline=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(batch=st.lists(st.tuples(st.none() | st.binary(max_size=8), values), min_size=60, max_size=120))
def test_generated_batch_gets_one_answer_per_offset(batch: list[tuple[bytes | None, bytes | None]],
                                                    kafka_bootstrap: str, tiny_model_dir: Path) -> None:
    stem = f"hyp-{int(time.time() * 1000) % 10**7}"
    topics = {"input": f"{stem}-in", "output": f"{stem}-out", "dead": f"{stem}-dlq", "group": f"{stem}-g"}
    create_topics(kafka_bootstrap, [topics["input"], topics["output"], topics["dead"]], partitions=4)
    settings = worker_settings(kafka_bootstrap, topics, tiny_model_dir)
    k = settings.kafka
    expected = []
    for _, value in batch:
        try:
            decode_input(value, input_format=k.input_format, max_message_bytes=k.max_message_bytes,
                         max_text_chars=k.max_text_chars)
            expected.append("out")
        except BadMessage as e:
            expected.append(e.reason)
    # kafka-python cannot send a record with neither key nor value: give those a key
    sent = produce(kafka_bootstrap, topics["input"],
                   [(b"k" if key is None and v is None else key, v, {}) for key, v in batch])
    worker = Worker(settings, Engine.from_settings(settings), None, replica_id="hyp").start()
    try:
        done = lambda: sum(worker.stats()["messages"].values()) >= len(sent)  # noqa: E731
        assert wait_for(lambda: done() or not worker.alive(), 60)
        assert worker.alive(), worker.error
    finally:
        worker.stop(20)
    got = read_all(kafka_bootstrap, [topics["output"], topics["dead"]], len(sent), timeout_s=30)
    check_answers(sent, expected, {"out": got[topics["output"]], "dead": got[topics["dead"]]})
