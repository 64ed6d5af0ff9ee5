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
from kafka_support import Reader, by_source, produce, read_all, rss_mb, run_cli, wait_for, worker_settings

from elbert_stream.engine.engine import Engine
from elbert_stream.errors import BadMessage
from elbert_stream.stream.records import OutputRecord, decode_input
from elbert_stream.stream.worker import Worker
from elbert_stream.testing.broker import create_topics

pytestmark = pytest.mark.integration
BIG = 10_000_000
NUM_BIG = int(os.environ.get("HOSTILE_NUM_BIG", "20"))
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


def allow_values_of(bootstrap: str, topic: str, num_bytes: int) -> None:
    """Raise ``topic``'s max.message.bytes (Kafka's default is ~1 MB), as an operator would for 10 MB
    inputs; a broker that enforces no such limit (quirk ``no_max_message_bytes``) needs nothing."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    from elbert_stream.testing.broker import quirks_of

    if "no_max_message_bytes" in quirks_of(bootstrap):
        return
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                            configs={"max.message.bytes": str(num_bytes)})])
    finally:
        admin.close()


@pytest.mark.both_brokers
def test_hostile_values_compressed_batches_and_10mb_values(kafka_bootstrap: str, topics: dict[str, str],
                                                            tiny_model_dir: Path, tmp_path: Path) -> None:
    """One ``elbert-stream run``: odd values, batches from gzip/snappy/lz4/zstd producers, then twelve
    10 MB values; its peak RSS must not grow by the size of what passed through."""
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
        # two rounds of 10 MB values on one key (one partition) plus a keyless one: the second round
        # must not raise the peak RSS the first one set (memory bounded, not growing with the input)
        peaks, big = [rss_mb(proc.pid, "VmHWM")], []
        for _round in range(2):
            bigs = [(b"big", b"x" * BIG, {}) for _ in range(NUM_BIG // 2)] + [(None, b"y" * BIG, {})]
            big += produce(kafka_bootstrap, topics["input"], bigs, max_request_size=BIG + 100_000)
            got = reader.read(len(sent) + len(big), timeout_s=90, settle_s=1.0)
            peaks.append(rss_mb(proc.pid, "VmHWM"))
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
    print(f"[hostile] {len(sent)} odd/compressed, then 2 rounds of {NUM_BIG // 2 + 1} x 10 MB "
          f"({per_round_mb:.0f} MB each): worker peak RSS {' -> '.join(f'{p:.0f}' for p in peaks)} MB")
    assert peaks[2] - peaks[1] < 0.5 * per_round_mb, "memory grew with the input"

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
