"""Integration fixtures: one real Kafka-compatible broker per test session.

By default a Tansu broker (``elbert_stream.testing.broker.EmbeddedBroker``) is started on a free loopback
port and stopped at the end of the session. Set ``ELBERT_TEST_KAFKA_BOOTSTRAP=host:port`` to run the
integration tests against an external broker instead (topics get unique names per test, so a shared
broker is fine).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from elbert_stream.testing.broker import EmbeddedBroker, create_topics

_topic_ids = itertools.count()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of the session's broker."""
    external = os.environ.get("ELBERT_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny ELBERT (6 layers, hidden 32, 5 BBC labels) with a BERT tokenizer, on disk."""
    from serve_support import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-elbert"))


@pytest.fixture
def topics(kafka_bootstrap: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """Fresh input/output/dead-letter topic names (4 partitions each) and a fresh group id."""
    stem = f"{request.node.name[:40]}-{next(_topic_ids)}-{int(time.time() * 1000) % 10**6}"
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)
    names = {"input": f"{stem}-in", "output": f"{stem}-out", "dead": f"{stem}-dlq", "group": f"{stem}-g"}
    create_topics(kafka_bootstrap, [names["input"], names["output"], names["dead"]], partitions=4)
    return names


@pytest.fixture(scope="session")
def noida_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a noida-db broker for this session: the second broker implementation, for the
    tests of behaviour the first one (Tansu) does not implement (e.g. topic ``max.message.bytes``,
    aborted records hidden from read_committed readers)."""
    from elbert_stream.testing.broker import NoidaBroker

    root = tmp_path_factory.mktemp("noida")
    with NoidaBroker(log_path=root / "noida.log", data_dir=root / "data") as broker:
        yield broker.bootstrap
