"""The pipelined worker against Tansu and the real engine: a full pipeline pauses the partitions, and a
revoke while work sits in every stage drops all of it, so nothing is answered twice.

The engine and the tokenizer are the real ones (tiny random ELBERT, its BERT tokenizer), each behind a
gate that holds it (the engine's ``step``; the tokenizer from its second batch on) until the test
opens it, so the stages stay full while the group rebalances."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kafka_support import by_source, other_member, produce, read_all, wait_for, worker_settings

from elbert_stream.engine.engine import Engine
from elbert_stream.engine.model import load_tokenizer
from elbert_stream.stream.worker import Worker

pytestmark = pytest.mark.integration
PER_PARTITION, MAX_POLL, MAX_QUEUE = 40, 20, 4


class GatedEngine:
    """The real engine; ``step`` waits until ``gate`` is set (``stepping`` says one is waiting)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.stepping = threading.Event()

    def step(self) -> Any:
        self.stepping.set()
        self.gate.wait()
        return self.engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class GatedTokenizer:
    """The real tokenizer, called like a Hugging Face one; from its second batch on it waits for ``gate``."""

    def __init__(self, tokenizer: Any, gate: threading.Event) -> None:
        self.tokenizer = tokenizer
        self.gate = gate
        self.calls = 0

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls > 1:
            self.gate.wait()
        return self.tokenizer(texts, **kwargs)


def test_full_pipeline_pauses_and_a_revoke_drops_work_in_every_stage(kafka_bootstrap: str,
                                                                    topics: dict[str, str],
                                                                    tiny_model_dir: Path) -> None:
    for p in range(4):
        produce(kafka_bootstrap, topics["input"], [(None, f"story {p}-{i} about the markets".encode(), {})
                                                  for i in range(PER_PARTITION)], partition=p)
    total = 4 * PER_PARTITION
    settings = worker_settings(kafka_bootstrap, topics, tiny_model_dir,
                               engine={"max_slots": 4, "max_queue": MAX_QUEUE},
                               kafka={"max_poll_records": MAX_POLL, "group_instance_id": ""})
    engine = GatedEngine(Engine.from_settings(settings))
    tokenizer = GatedTokenizer(load_tokenizer(tiny_model_dir), engine.gate)
    worker = Worker(settings, engine, tokenizer, replica_id="gated").start()  # type: ignore[arg-type]
    try:
        # 1. the engine holds its queue, the stages before it (a batch in the tokenizer, the rest
        # waiting for the engine) the whole budget: every partition paused
        assert wait_for(lambda: engine.stepping.is_set() and tokenizer.calls > 1 and worker.stats()["paused"]
                        and worker.stats()["backlog"] == MAX_POLL, 60), worker.stats()
        arrived = worker.stats()["num_arrived"]
        time.sleep(1.0)  # paused: nothing more is polled (progress would show in num_arrived)
        assert worker.stats()["num_arrived"] == arrived <= MAX_POLL + MAX_QUEUE, worker.stats()

        # 2. a second member joins (the group takes every partition from the worker and gives back
        # part), then leaves (the worker gets all back): its polled work is of a revoked assignment
        with other_member(settings.kafka, topics["input"]) as other:
            revoked = lambda: worker.stats()["num_revocations"] >= 1 and bool(other.assignment())  # noqa: E731
            assert wait_for(revoked, 90), worker.stats()
        # it left: the worker gets every partition back (its revocation count may stay at 1: a join
        # kafka-python lost while the other was there leaves it without the split assignment)
        assert wait_for(lambda: (s := worker.stats())["rebalancing_s"] is None
                        and s["num_partitions_assigned"] == 4, 90), worker.stats()

        # 3. the engine runs again: the stale work is dropped where it is, everything is read again
        engine.gate.set()
        assert wait_for(lambda: worker.stats()["messages"]["ok"] >= total, 120), worker.stats()
        stats = worker.stats()
    finally:
        engine.gate.set()
        worker.stop(20)
    assert worker.error is None, worker.error
    got = read_all(kafka_bootstrap, [topics["output"], topics["dead"]], total)
    index = by_source({"out": got[topics["output"]], "dead": got[topics["dead"]]})
    assert len(index) == total and all(len(v) == 1 for v in index.values()), (
        "every input answered exactly once: " + repr({p: len(v) for p, v in index.items() if len(v) != 1}))
    dropped = {name: s["dropped_revoked"] for name, s in stats["stages"].items()}
    print(f"[pipeline] arrived before the revoke {arrived}; dropped per stage {dropped}")
    assert stats["num_dropped_revoked"] == arrived, "each message polled before the revoke, dropped once"
    assert dropped["output"] > 0, "requests queued in the engine ran; their answers were dropped"
    assert dropped["engine"] > 0, "requests waiting for the engine were dropped before it"
    assert dropped["tokenizer"] > 0, "the batch being tokenized was dropped before the engine"
    assert stats["num_arrived"] == arrived + total and stats["backlog"] == 0 and not stats["paused"]
