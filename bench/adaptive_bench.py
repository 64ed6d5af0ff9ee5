"""Load-adaptive exit under a burst: fixed thresholds vs adaptive gears, same schedule, one run.

Embedded Tansu, ONE Worker (no Ray), the shipped model and its ``gears.json``. First the capacity
``C`` (messages/s) of the fixed worker is measured on a backlog. Then each mode runs the same offered
load: ``--base-load`` x C for ``--base-s``, ``--burst-load`` x C for ``--burst-s``, ``--base-load`` x C
for ``--after-s`` (BBC validation + test texts, cycled, as JSON with an id). Modes run back to back
(``--rounds`` alternates their order). Per mode: p50/p99 end-to-end latency (input record timestamp
-> output produced) during the burst and overall, the maximum outstanding messages (produced, not
yet answered: the lag), messages/s answered during the burst, accuracy against the gold labels and
consistency with the full-depth label during the burst and overall, messages lost, the gear trace and
when the gears were back at the default after the burst. Writes ``adaptive.json``, ``adaptive.md`` and
``adaptive.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from bench.adaptive_report import summarise, write_results
from elbert_stream.config import Settings, model_dir
from elbert_stream.engine.engine import Engine
from elbert_stream.errors import ElbertError
from elbert_stream.stream.records import OutputRecord
from elbert_stream.stream.worker import Worker
from elbert_stream.testing.broker import EmbeddedBroker
from elbert_stream.testing.streamcheck import TopicReader, produce_values

log = logging.getLogger(__name__)
SAMPLE_EVERY_S = 0.5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-s", type=float, default=20.0, help="seconds at the base load before the burst")
    p.add_argument("--burst-s", type=float, default=30.0, help="seconds of burst (the issue asks 60)")
    p.add_argument("--after-s", type=float, default=45.0, help="seconds at the base load after the burst")
    p.add_argument("--base-load", type=float, default=0.6, help="offered load outside the burst, x capacity")
    p.add_argument("--burst-load", type=float, default=2.0, help="offered load in the burst, x capacity")
    p.add_argument("--capacity", type=float, help="messages/s of the fixed worker (default: measure it)")
    p.add_argument("--latency-target-ms", type=float, default=2000.0)
    p.add_argument("--budget", type=float, default=1.5, help="max accuracy points below gear 0 (validation)")
    p.add_argument("--settle-s", type=float, default=5.0, help="adaptive.settle_s")
    p.add_argument(
        "--rounds", type=int, default=1, help="fixed/adaptive pairs; odd rounds run adaptive first"
    )


# ---- data -------------------------------------------------------------------------------------
def labelled_texts() -> tuple[list[str], list[str], list[str]]:
    """BBC validation + test texts (the model's split), their gold labels and full-depth labels."""
    from elbert_stream.engine.model import ElbertModel, load_tokenizer
    from elbert_stream.training.files import Columns
    from elbert_stream.training.scoring import all_depth_probs, encode
    from elbert_stream.training.splits import evaluation_sets

    path = model_dir(None)
    sets = evaluation_sets(path, None, None, Columns())
    val, test = sets.val, sets.test
    texts = val.texts + test.texts
    gold = [val.label_names[y] for y in val.labels] + [test.label_names[y] for y in test.labels]
    model = ElbertModel.from_pretrained(path)
    probs = all_depth_probs(model, *encode(load_tokenizer(path), texts, 128))  # [L, N, K]
    full = [model.label_names[i] for i in probs[-1].argmax(-1).tolist()]
    return texts, gold, full


# ---- one run ----------------------------------------------------------------------------------
def settings_for(bootstrap: str, tag: str, adaptive: dict[str, Any] | None) -> Settings:
    return Settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "input_topics": [f"{tag}-in"],
            "output_topic": f"{tag}-out",
            "dead_letter_topic": f"{tag}-dlq",
            "group_id": f"{tag}-g",
            "input_format": "json",
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
        adaptive=adaptive or {"enabled": False},
    )


def produce_schedule(
    bootstrap: str,
    topic: str,
    texts: list[str],
    phases: list[tuple[float, float]],
    sent: dict[int, float],
    start_id: int,
    done: threading.Event,
) -> None:
    """Offer JSON messages at ``phases`` [(seconds, msgs/s)], paced in 10 ms ticks; ``sent[id]`` =
    epoch seconds at send."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
    try:
        i, t0, owed = start_id, time.monotonic(), 0.0
        for seconds, rate in phases:
            end = t0 + seconds
            last = t0
            while (now := time.monotonic()) < end:
                owed += (now - last) * rate
                last = now
                while owed >= 1.0:
                    sent[i] = time.time()
                    producer.send(topic, value=_values(texts, i, 1)[0])
                    i, owed = i + 1, owed - 1.0
                time.sleep(0.01)
            t0 = end
        producer.flush()
    finally:
        producer.close()
        done.set()


def _values(texts: list[str], first: int, n: int) -> list[bytes]:
    return [json.dumps({"text": texts[i % len(texts)], "id": i}).encode() for i in range(first, first + n)]


def _wait_finished(worker: Worker, count: int, timeout_s: float = 120.0) -> None:
    """Until the worker answered ``count`` messages; ``timeout_s`` bounds a wait without progress."""
    last, deadline = -1, time.monotonic() + timeout_s
    while (done := int(worker.stats()["num_finished"])) < count and worker.alive():
        if done != last:
            last, deadline = done, time.monotonic() + timeout_s
        if time.monotonic() > deadline:
            raise ElbertError(f"worker {worker.replica_id}: stuck at {done} of {count} answers")
        time.sleep(0.05)


def _wait_joined(worker: Worker, bootstrap: str, settings: Settings, texts: list[str]) -> int:
    """Warm up: 20 messages through, so the group has joined before the clock starts; returns 20."""
    produce_values(bootstrap, settings.kafka.input_topics[0], _values(texts, 0, 20))
    _wait_finished(worker, 20)
    return 20


def run_mode(
    bootstrap: str,
    broker: EmbeddedBroker,
    tag: str,
    adaptive: dict[str, Any] | None,
    texts: list[str],
    phases: list[tuple[float, float]],
) -> dict[str, Any]:
    """One worker through the schedule: every output record, and timeline samples every 0.5 s."""
    settings = settings_for(bootstrap, tag, adaptive)
    broker.create_topics([f"{tag}-in", f"{tag}-out", f"{tag}-dlq"], 4)
    worker = Worker(settings, Engine.from_settings(settings), None, replica_id=tag).start()
    warm = _wait_joined(worker, bootstrap, settings, texts)
    sent: dict[int, float] = {}
    produced = threading.Event()
    start = time.time()
    threading.Thread(
        target=produce_schedule,
        daemon=True,
        args=(bootstrap, f"{tag}-in", texts, phases, sent, 1000, produced),
    ).start()
    reader = TopicReader(bootstrap, [f"{tag}-out", f"{tag}-dlq"])
    timeline: list[dict[str, Any]] = []
    last_progress, last_count = time.monotonic(), 0
    while not (
        produced.is_set() and reader.count(f"{tag}-out") + reader.count(f"{tag}-dlq") >= warm + len(sent)
    ):
        reader.poll(100)
        count = reader.count(f"{tag}-out")
        if count != last_count:
            last_progress, last_count = time.monotonic(), count
        if time.monotonic() - last_progress > 60 or not worker.alive():
            log.error("%s: no progress for 60 s (or the worker died): stopping the run", tag)
            break
        if not timeline or time.time() - start - timeline[-1]["t_s"] >= SAMPLE_EVERY_S:
            timeline.append(
                {
                    "t_s": time.time() - start,
                    "outstanding": len(sent) + warm - count,
                    "gear": worker.gears.gear,
                }
            )
    stats = worker.stats()
    worker.stop(20)
    records = [OutputRecord.from_bytes(r.value or b"") for r in reader.records[f"{tag}-out"]]
    reader.close()
    return {
        "start_s": start,
        "sent": sent,
        "records": [r for r in records if isinstance(r.id, int) and r.id >= 1000],
        "timeline": timeline,
        "trace": stats["adaptive"].get("trace", []),
        "dead_letters": len(reader.records[f"{tag}-dlq"]),
        "error": repr(worker.error) if worker.error else None,
    }


def measure_capacity(bootstrap: str, broker: EmbeddedBroker, texts: list[str], n: int = 600) -> float:
    """Messages/s of the fixed worker on a backlog of ``n`` (from the 100th to the last answer)."""
    settings = settings_for(bootstrap, "capacity", None)
    broker.create_topics(["capacity-in", "capacity-out", "capacity-dlq"], 4)
    worker = Worker(settings, Engine.from_settings(settings), None, replica_id="capacity").start()
    warm = _wait_joined(worker, bootstrap, settings, texts)
    produce_values(bootstrap, "capacity-in", _values(texts, 1000, n))  # a backlog of n
    _wait_finished(worker, warm + 100)
    t0 = time.monotonic()
    _wait_finished(worker, warm + n)
    elapsed = time.monotonic() - t0
    worker.stop(10)
    return (n - 100) / elapsed


def run_adaptive_bench(args: argparse.Namespace) -> int:
    texts, gold, full = labelled_texts()
    adaptive = {
        "enabled": True,
        "latency_target_ms": args.latency_target_ms,
        "max_accuracy_loss_points": args.budget,
        "settle_s": args.settle_s,
    }
    runs: dict[str, list[dict[str, Any]]] = {"fixed": [], "adaptive": []}
    with EmbeddedBroker() as broker:
        capacity = args.capacity or measure_capacity(broker.bootstrap, broker, texts)
        log.info("capacity %.1f msgs/s", capacity)
        phases = [
            (args.base_s, args.base_load * capacity),
            (args.burst_s, args.burst_load * capacity),
            (args.after_s, args.base_load * capacity),
        ]
        for r in range(args.rounds):
            order = ["fixed", "adaptive"] if r % 2 == 0 else ["adaptive", "fixed"]
            for mode in order:
                log.info("round %d: %s", r, mode)
                raw = run_mode(
                    broker.bootstrap,
                    broker,
                    f"{mode}{r}",
                    adaptive if mode == "adaptive" else None,
                    texts,
                    phases,
                )
                runs[mode].append(summarise({**raw, "capacity": capacity}, gold, full, args))
    doc = {
        "command": args.command_line,
        "capacity_msgs_per_s": capacity,
        "phases": phases,
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "command_line")},
        "adaptive_settings": adaptive,
        "runs": runs,
    }
    for path in write_results(doc, Path(args.out)):
        log.info("wrote %s", path)
    return 0
