"""``elbert-stream demo`` (``make demo``): the whole stream on one machine, in a few minutes.

An embedded broker (``--broker``: Tansu or noida-db) on a free loopback port, a private local Ray
with the Serve app (``ElbertWorker`` replicas, each owning a worker on the broker's input topic), the
BBC test split produced as JSON plus a handful of bad messages, live progress from the output topic,
then a summary: throughput, end-to-end latency, exit-depth histogram, accuracy, dead letters and their
reasons. Everything it started is stopped at the end, and it checks that no child process is
left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elbert_stream.errors import ElbertError
from elbert_stream.testing.broker import BROKERS, embedded_broker, free_port
from elbert_stream.testing.streamcheck import (
    Accounting,
    Received,
    Sent,
    TopicReader,
    account,
    percentile,
    produce_values,
)
from elbert_stream.training.data import Dataset, load_bbc, read_split, split_dataset

log = logging.getLogger(__name__)

INPUT, OUTPUT, DEAD = "elbert-input", "elbert-output", "elbert-dead-letter"
DEMO_MAX_MESSAGE_BYTES = 200_000


@dataclass(frozen=True)
class BadInput:
    """A message that must come back as a dead letter with ``reason``."""

    name: str
    value: bytes | None
    reason: str


def bad_inputs() -> list[BadInput]:
    """One of each kind of unprocessable message (reasons from ``records.DEAD_LETTER_REASONS``)."""
    return [
        BadInput("not UTF-8", b"\xff\xfe\x00 caf\xe9", "not_utf8"),
        BadInput("empty value", b"", "bad_json"),  # input_format=json: an empty value is not JSON
        BadInput("blank text", json.dumps({"text": "   ", "id": "blank"}).encode(), "empty"),
        BadInput("bad JSON", b'{"text": "unterminated', "bad_json"),
        BadInput("JSON without text", json.dumps({"id": "no-text"}).encode(), "no_text"),
        BadInput("tombstone", None, "null_value"),
        BadInput("too large", json.dumps({"text": "x" * (DEMO_MAX_MESSAGE_BYTES + 10)}).encode(),
                 "too_large"),
    ]


def test_split(model_dir: Path | None) -> Dataset:
    """The BBC test split the model never saw: its ``split.json`` if saved, else the default split."""
    data = load_bbc()
    split_file = model_dir / "split.json" if model_dir else None
    if split_file is not None and split_file.is_file():
        return read_split(split_file, data)["test"]
    return split_dataset(data)["test"]


def demo_overrides(bootstrap: str, model_path: str | None,
                   broker_settings: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Settings for the replicas: the embedded broker (and what its quirks need), JSON input, a small
    message limit."""
    return {
        "model": {"path": model_path, "device": "auto"},
        "kafka": {"bootstrap_servers": bootstrap, "input_topics": [INPUT], "output_topic": OUTPUT,
                  "dead_letter_topic": DEAD, "group_id": "elbert-demo", "input_format": "json",
                  "max_message_bytes": DEMO_MAX_MESSAGE_BYTES, "session_timeout_ms": 6000,
                  "heartbeat_interval_ms": 1000, **(broker_settings or {}).get("kafka", {})},
    }


def _model_dir(path: str | None) -> Path | None:
    if path:
        return Path(path)
    from elbert_stream.engine.model import shipped_model_dir

    return shipped_model_dir()


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when every message came back exactly once (output or dead letter)."""
    from rich.console import Console

    console = Console()
    t0 = time.monotonic()
    model_dir = _model_dir(args.model)
    data = test_split(model_dir)
    if args.limit:
        data = data.subset(range(min(args.limit, len(data))))
    from elbert_stream.serve import local

    with embedded_broker(args.broker) as broker:
        broker.create_topics([INPUT, OUTPUT, DEAD], args.partitions)
        console.print(f"[bold]broker[/] {broker.name} on {broker.bootstrap}, {args.partitions} partitions "
                      "per topic")
        try:
            http_port = free_port()
            local.start_local_ray(args.cpus, http_port=http_port, log_to_driver=args.verbose)
            local.run_local_app(demo_overrides(broker.bootstrap, args.model, broker.product_settings),
                                name="elbert-demo", num_replicas=args.replicas,
                                num_cpus=min(1.0, args.cpus / args.replicas))
            owners = local.wait_until_consuming("elbert-demo", http_port, num_replicas=args.replicas)
            console.print(f"[bold]serve[/] {len(owners)} ElbertWorker replica(s) consuming, "
                          f"HTTP on 127.0.0.1:{http_port} ({time.monotonic() - t0:.1f}s since start)")
            result = _stream(console, broker.bootstrap, data, args.timeout)
        finally:
            local.shutdown_local_ray()
    leftovers = _child_processes()
    _print_summary(console, data, *result, leftovers=leftovers, elapsed_s=time.monotonic() - t0)
    acc = result[0]
    ok = not acc.lost and not acc.both and not leftovers
    return 0 if ok else 1


def _stream(console: Any, bootstrap: str, data: Dataset,
            timeout_s: float) -> tuple[Accounting, list[Sent], list[BadInput]]:
    """Produce the split and the bad inputs, show live progress until all are answered."""
    from rich.live import Live

    values = [json.dumps({"text": e.text, "id": e.id}).encode() for e in data.examples]
    bad = bad_inputs()
    keys = [e.id.encode() for e in data.examples] + [f"bad/{b.name}".encode() for b in bad]
    sent = produce_values(bootstrap, INPUT, values + [b.value for b in bad], keys)
    total = len(sent)
    console.print(f"[bold]produced[/] {len(values)} BBC test articles + {len(bad)} bad messages")
    live = Live(console=console, refresh_per_second=4)
    with TopicReader(bootstrap, [OUTPUT, DEAD]) as reader, live:
        start = time.monotonic()
        done = reader.poll_until(
            lambda r: r.count(OUTPUT) + r.count(DEAD) >= total
            and not account(sent, r.records[OUTPUT], r.records[DEAD]).lost,
            timeout_s, on_progress=lambda r: live.update(_progress(r, total, start)))
        if not done:
            console.print(f"[red]timed out after {timeout_s:.0f}s[/]")
        acc = account(sent, reader.records[OUTPUT], reader.records[DEAD])
    return acc, sent, bad


def _depth_histogram(reader_records: list[Received]) -> Counter[int]:
    hist: Counter[int] = Counter()
    for rec in reader_records:
        try:
            hist[int(json.loads(rec.value or b"{}")["exit_depth"])] += 1
        except (ValueError, KeyError):
            continue
    return hist


def _bars(hist: Counter[int], width: int = 40) -> str:
    if not hist:
        return "(none yet)"
    top = max(hist.values())
    return "\n".join(f"  depth {d:>2} {'#' * max(1, round(width * n / top)):<{width}} {n}"
                     for d, n in sorted(hist.items()))


def _progress(reader: TopicReader, total: int, start: float) -> Any:
    from rich.panel import Panel

    outs = reader.records[OUTPUT]
    done = len(outs) + reader.count(DEAD)
    elapsed = max(1e-6, time.monotonic() - start)
    text = (f"done {done}/{total}  ({len(outs)} predictions, {reader.count(DEAD)} dead letters)  "
            f"{len(outs) / elapsed:.1f} msg/s\n{_bars(_depth_histogram(outs))}")
    return Panel(text, title="elbert-stream demo: live", expand=False)


def _print_summary(console: Any, data: Dataset, acc: Accounting, sent: list[Sent], bad: list[BadInput], *,
                   leftovers: list[str], elapsed_s: float) -> None:
    from rich.table import Table

    outs = [o for recs in acc.outputs.values() for o in recs[:1]]
    by_id = {e.id: e for e in data.examples}
    correct = sum(1 for o in outs if str(o.id) in by_id and o.label_index == by_id[str(o.id)].label)
    e2e = [o.end_to_end_ms for o in outs if o.end_to_end_ms is not None]
    first_sent = min(s.sent_s for s in sent)
    last_out = max((o.produced_ms / 1e3 for o in outs), default=first_sent)
    first_out = min((o.produced_ms / 1e3 for o in outs), default=last_out)
    hist = Counter(o.exit_depth for o in outs)
    table = Table(title="elbert-stream demo: summary", show_header=False)
    table.add_row("messages", f"{acc.num_inputs} in, {len(acc.outputs)} predictions, "
                              f"{len(acc.dead_letters)} dead letters, {len(acc.lost)} lost, "
                              f"{acc.num_duplicates} duplicates")
    rate = len(outs) / max(1e-6, last_out - first_sent)
    steady = (len(outs) - 1) / max(1e-6, last_out - first_out)
    table.add_row("throughput", f"{rate:.1f} msg/s first send -> last output; "
                                f"{steady:.1f} msg/s first -> last output")
    table.add_row("end-to-end latency",
                  f"p50 {percentile(e2e, 0.5):.0f} ms, p99 {percentile(e2e, 0.99):.0f} ms "
                  "(input record timestamp -> output produced)")
    table.add_row("accuracy", f"{correct}/{len(outs)} = {correct / max(1, len(outs)):.3f}")
    table.add_row("mean exit depth", f"{sum(d * n for d, n in hist.items()) / max(1, len(outs)):.2f}")
    table.add_row("exit depths", _bars(hist, width=30))
    reasons = acc.dead_letter_reasons()
    expected = Counter(b.reason for b in bad)
    table.add_row("dead letters", ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items())) or "none")
    table.add_row("dead letters as expected",
                  "yes" if reasons == expected else f"NO (expected {dict(expected)})")
    if acc.lost:
        by_part = Counter(p for _, p, _ in acc.lost)
        table.add_row("lost (never answered)", ", ".join(
            f"partition {p}: {n} from offset {min(o for _, q, o in acc.lost if q == p)}"
            for p, n in sorted(by_part.items())))
    table.add_row("left-over processes", ", ".join(leftovers) or "none")
    table.add_row("wall time", f"{elapsed_s:.1f} s")
    console.print(table)


def _child_processes() -> list[str]:
    """Descendants of this process still alive (after shutdown there should be none)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if rest[0] == "Z":
            continue
        children.setdefault(int(rest[1]), []).append(int(entry.name))
        names[int(entry.name)] = name
    out, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        out.append(f"{names.get(pid, '?')}[{pid}]")
        todo += children.get(pid, [])
    return out


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="broker + Ray Serve + the BBC test split, end to end, with a summary")
    p.add_argument("--model", default=None, help="model dir (default: the shipped BBC model)")
    p.add_argument("--replicas", type=int, default=1, help="ElbertWorker replicas")
    p.add_argument("--broker", choices=sorted(BROKERS), default=None,
                   help="embedded broker (default $ELBERT_EMBEDDED_BROKER, else "
                        "testing.broker.DEFAULT_BROKER; docs/streaming.md says which and why)")
    p.add_argument("--cpus", type=int, default=2,
                   help="CPUs of the local Ray; each replica takes 1 (one torch thread: fastest here)")
    p.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    p.add_argument("--limit", type=int, default=0, help="only the first N test articles (0 = all)")
    p.add_argument("--timeout", type=float, default=150.0, help="give up waiting after this many seconds")
    p.add_argument("--verbose", action="store_true", help="show the replicas' logs (Ray log_to_driver)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    for name in ("ray", "ray.serve", "kafka", "elbert_stream.testing.broker"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return run_demo(args)
    except ElbertError as e:
        log.error("demo failed: %s", e)
        return 1
