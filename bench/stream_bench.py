"""Streaming benchmark: broker -> Serve replica -> broker, side by side with the engine alone.

One run, same texts, same model, same CPU budget:

1. ``engine``: in this process, ``Engine.tokenize`` + ``Engine.run_all`` over the texts with
   ``torch`` limited to the replica's CPUs -> messages/s (the ceiling the stream can reach); run
   before and after the stream runs, the faster of the two counts;
2. ``stream_saturated``: the texts are produced to the input topic as a backlog, then one
   ``ElbertWorker`` replica consumes them -> messages/s from its first to its last output record;
   ``ratio = stream_saturated / engine`` (target >= 0.9);
3. ``stream_fixed_rate``: the texts again, offered at ``--load`` x the engine's rate -> achieved
   messages/s and p50/p99 end-to-end latency (input record timestamp -> output produced).

Phases 2 and 3 run on each embedded broker in turn (``--brokers``, default Tansu and noida-db).
Writes ``bench/results/stream.json`` and ``stream.md`` with the command that produced them.
Entry point for ``elbert-stream bench``: :func:`run_stream_bench`.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from elbert_stream.config import Settings
from elbert_stream.errors import ElbertError
from elbert_stream.testing.broker import BROKERS, embedded_broker, free_port
from elbert_stream.testing.streamcheck import TopicReader, account, percentile, produce_values

log = logging.getLogger(__name__)

INPUT, OUTPUT, DEAD = "bench-input", "bench-output", "bench-dead-letter"


def bench_settings(bootstrap: str, model_path: str | None, group: str,
                   broker_settings: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "model": {"path": model_path},
        "kafka": {"bootstrap_servers": bootstrap, "input_topics": [INPUT], "output_topic": OUTPUT,
                  "dead_letter_topic": DEAD, "group_id": group, "input_format": "text",
                  "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
                  **(broker_settings or {}).get("kafka", {})},
    }


def engine_only(settings: Settings, texts: list[str], threads: int) -> dict[str, Any]:
    """Tokenize + run every text through a fresh engine in this process (after one warm-up pass)."""
    from elbert_stream.engine.engine import Engine
    from elbert_stream.types import Request

    torch.set_num_threads(threads)
    engine = Engine.from_settings(settings)
    engine.run_all([Request(ids) for ids in engine.tokenize(texts[:64])])  # warm-up
    t0 = time.perf_counter()
    preds = engine.run_all([Request(ids) for ids in engine.tokenize(texts)])
    elapsed = time.perf_counter() - t0
    depths = [p.exit_depth for p in preds]
    return {"messages": len(preds), "seconds": elapsed, "msgs_per_s": len(preds) / elapsed,
            "mean_exit_depth": sum(depths) / len(depths)}


def _drain(bootstrap: str, sent_count: int, timeout_s: float) -> tuple[TopicReader, bool]:
    reader = TopicReader(bootstrap, [OUTPUT, DEAD])
    ok = reader.poll_until(lambda r: r.count(OUTPUT) + r.count(DEAD) >= sent_count, timeout_s)
    return reader, ok


def stream_phase(bootstrap: str, texts: list[str], rate_per_s: float | None, timeout_s: float,
                 skip_outputs: int) -> dict[str, Any]:
    """Produce ``texts`` (backlog when ``rate_per_s`` is None) and read every answer back.

    ``skip_outputs``: output records already on the topic from an earlier phase.
    """
    sent = produce_values(bootstrap, INPUT, [t.encode() for t in texts], rate_per_s=rate_per_s)
    reader, ok = _drain(bootstrap, skip_outputs + len(sent), timeout_s)
    try:
        acc = account(sent, reader.records[OUTPUT], reader.records[DEAD])
    finally:
        reader.close()
    outs = [recs[0] for recs in acc.outputs.values()]
    if not outs:
        raise ElbertError(f"no output records within {timeout_s}s")
    produced = sorted(o.produced_ms for o in outs)
    span_s = (produced[-1] - produced[0]) / 1e3 if rate_per_s is None else (
        produced[-1] / 1e3 - min(s.sent_s for s in sent))
    e2e = [o.end_to_end_ms for o in outs if o.end_to_end_ms is not None]
    return {"offered_msgs_per_s": rate_per_s or "backlog", "messages": len(sent), "complete": ok,
            **acc.summary(), "seconds": span_s, "msgs_per_s": len(outs) / max(span_s, 1e-6),
            "p50_ms": percentile(e2e, 0.5), "p99_ms": percentile(e2e, 0.99),
            "mean_exit_depth": sum(o.exit_depth for o in outs) / len(outs)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All three measurements; returns the result document."""
    from bench.harness import bench_texts, repeat_to

    texts = repeat_to(bench_texts(), args.messages)[: args.messages]
    settings = Settings.model_validate({"model": {"path": args.model}})
    engine_before = engine_only(settings, texts, args.threads)
    log.info("engine alone: %.1f msg/s", engine_before["msgs_per_s"])
    brokers = {kind: on_broker(kind, args, texts, engine_before["msgs_per_s"]) for kind in args.brokers}
    engine_after = engine_only(settings, texts, args.threads)
    # the better of the two engine runs (they bracket the stream runs): a conservative ratio on a
    # machine whose load may change during the run
    engine = max(engine_before, engine_after, key=lambda e: e["msgs_per_s"])
    return {
        "benchmark": "stream",
        "command": getattr(args, "command_line", None) or getattr(args, "invocation", None)
                   or shlex.join(["elbert-stream", *sys.argv[1:]]),
        "machine": {"ray_cpus": args.cpus, "torch_threads": args.threads, "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "model": args.model or "shipped", "partitions": args.partitions,
        "engine": engine, "engine_runs_msgs_per_s": [engine_before["msgs_per_s"], engine_after["msgs_per_s"]],
        "brokers": {kind: {**b, "ratio_stream_over_engine": b["stream_saturated"]["msgs_per_s"]
                           / engine["msgs_per_s"]} for kind, b in brokers.items()},
        "ratio_target": 0.9,
    }


def on_broker(kind: str, args: argparse.Namespace, texts: list[str], engine_rate: float) -> dict[str, Any]:
    """The stream phases (warm-up, saturated, fixed rate) on one embedded broker."""
    from elbert_stream.serve import local

    t_start = time.monotonic()
    with embedded_broker(kind) as broker:
        start_s = time.monotonic() - t_start
        broker.create_topics([INPUT, OUTPUT, DEAD], args.partitions)
        try:
            t0 = time.monotonic()
            local.start_local_ray(args.cpus, http_port=free_port())
            local.run_local_app(bench_settings(broker.bootstrap, args.model, "elbert-bench",
                                               broker.product_settings),
                                name="elbert-bench", num_replicas=1, num_cpus=args.threads)
            _warm_up(broker.bootstrap, texts[:32], args.timeout)
            ready_s = time.monotonic() - t0
            saturated = stream_phase(broker.bootstrap, texts, None, args.timeout, skip_outputs=32)
            fixed = stream_phase(broker.bootstrap, texts, args.load * engine_rate, args.timeout,
                                 skip_outputs=32 + len(texts))
        finally:
            local.shutdown_local_ray()
    log.info("%s: stream %.1f msg/s", broker.name, saturated["msgs_per_s"])
    return {"broker": broker.name, "broker_start_s": start_s, "ready_s": ready_s,
            "stream_saturated": saturated, "stream_fixed_rate": fixed}


def _warm_up(bootstrap: str, texts: list[str], timeout_s: float) -> None:
    """Wait until the replica has joined the group and answered a few messages (not measured)."""
    sent = produce_values(bootstrap, INPUT, [t.encode() for t in texts])
    reader, ok = _drain(bootstrap, len(sent), timeout_s)
    reader.close()
    if not ok:
        raise ElbertError(f"the replica answered no warm-up message within {timeout_s}s")


def write_results(doc: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stream.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / "stream.md").write_text(markdown(doc))


def markdown(doc: dict[str, Any]) -> str:
    e = doc["engine"]
    rows = [("engine alone (tokenize + run_all)", "-", f"{e['msgs_per_s']:.1f}", "-", "-",
             f"{e['mean_exit_depth']:.2f}", "-", "-")]
    for b in doc["brokers"].values():
        s, f = b["stream_saturated"], b["stream_fixed_rate"]
        rows += [
            ("stream, backlog (saturated)", b["broker"], f"{s['msgs_per_s']:.1f}", f"{s['p50_ms']:.0f}",
             f"{s['p99_ms']:.0f}", f"{s['mean_exit_depth']:.2f}", f"{s['lost']} / {s['duplicates']}",
             f"{b['ratio_stream_over_engine']:.3f}"),
            (f"stream, offered {f['offered_msgs_per_s']:.1f} msg/s", b["broker"], f"{f['msgs_per_s']:.1f}",
             f"{f['p50_ms']:.0f}", f"{f['p99_ms']:.0f}", f"{f['mean_exit_depth']:.2f}",
             f"{f['lost']} / {f['duplicates']}", "-"),
        ]
    ready = ", ".join(f"{b['broker']} {b['ready_s']:.1f} s (broker start {b['broker_start_s']:.1f} s)"
                      for b in doc["brokers"].values())
    lines = [
        "# Streaming benchmark: broker -> Serve replica -> broker vs the engine alone", "",
        f"Command: `{doc['command']}`", "",
        f"Machine: local Ray with {doc['machine']['ray_cpus']} CPUs; the replica and the engine alone both "
        f"use {doc['machine']['torch_threads']} torch thread(s) (= the replica's num_cpus); "
        f"CUDA {doc['machine']['cuda']}; model {doc['model']}; {doc['partitions']} input partitions; "
        f"{e['messages']} BBC val+test texts per row; the same stream on each embedded broker in turn.", "",
        "| path | broker | msg/s | p50 e2e ms | p99 e2e ms | mean exit depth | lost / duplicates "
        "| / engine alone |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *("| " + " | ".join(r) + " |" for r in rows), "",
        f"Ratio target (saturated stream / engine alone) >= {doc['ratio_target']}. Local Ray + replica "
        f"start until the first answers: {ready}.", "",
        "The engine ran alone before and after the stream runs ("
        + ", ".join(f"{r:.1f}" for r in doc["engine_runs_msgs_per_s"])
        + " msg/s); the table and the ratios use the faster of the two.", "",
        "End-to-end latency = input record timestamp -> output record produced, so the backlog row's "
        "latency includes the time a message waited in the topic.", "",
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model dir (default: the shipped BBC model)")
    p.add_argument("--messages", type=int, default=1000, help="texts per measurement")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the engine-alone run = the replica's num_cpus (1 is fastest on a "
                        "shared 2-core machine)")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--brokers", type=lambda v: [k.strip() for k in v.split(",") if k.strip()],
                   default=sorted(BROKERS), help=f"comma-separated embedded brokers, each in turn "
                   f"(default {','.join(sorted(BROKERS))})")
    p.add_argument("--load", type=float, default=0.7, help="fixed offered load as a fraction of engine msg/s")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each phase")
    p.add_argument("--out", default="bench/results", help="where stream.json / stream.md go")


def run_stream_bench(args: argparse.Namespace) -> int:
    """``elbert-stream bench stream``: run, write results, return an exit status."""
    for name in ("ray", "ray.serve", "kafka"):
        logging.getLogger(name).setLevel(logging.WARNING)
    doc = run(args)
    write_results(doc, Path(args.out))
    for b in doc["brokers"].values():
        log.info("%s: stream/engine throughput ratio %.3f (target %.1f)", b["broker"],
                 b["ratio_stream_over_engine"], doc["ratio_target"])
    log.info("wrote %s/stream.{json,md}", args.out)
    ok = all(b[phase]["lost"] == 0 for b in doc["brokers"].values()
             for phase in ("stream_saturated", "stream_fixed_rate"))
    return 0 if ok else 1
