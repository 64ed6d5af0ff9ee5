"""Integration fixtures: real Kafka-protocol brokers, started once per test session.

``kafka_bootstrap`` is the session's main broker: ``$ELBERT_TEST_BROKER`` (``tansu``, the default, or
``noida``), an embedded broker on a free loopback port. Tests marked ``both_brokers`` run once on each
embedded broker (``kafka_bootstrap`` parametrized ``[tansu]`` / ``[noida]``): the representative
subset that keeps the suite within its time budget while every behaviour it checks is seen on two
independent implementations. ``tansu_bootstrap`` / ``noida_bootstrap`` name one broker explicitly
(a test of that broker's behaviour). ``elbert_stream.testing.broker.quirks_of(bootstrap)`` says which
known quirks the broker under test has, so assertions are strict wherever it implements the
behaviour. Set ``ELBERT_TEST_KAFKA_BOOTSTRAP=host:port`` to run every integration test against an
external cluster instead (no quirks assumed; topics get unique names per test, so a shared broker
is fine).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from elbert_stream.testing.broker import EmbeddedBroker, broker_kind, create_topics

_topic_ids = itertools.count()


EXTERNAL = os.environ.get("ELBERT_TEST_KAFKA_BOOTSTRAP")
MAIN_BROKER = broker_kind(os.environ.get("ELBERT_TEST_BROKER"))
BOTH = ["tansu", "noida"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``both_brokers`` tests: ``kafka_bootstrap`` once per embedded broker (ids ``[tansu]``, ``[noida]``)."""
    if (not EXTERNAL and "kafka_bootstrap" in metafunc.fixturenames
            and metafunc.definition.get_closest_marker("both_brokers")):
        metafunc.parametrize("kafka_bootstrap", BOTH, indirect=True, scope="session")


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """``host:port`` of the broker under test: the external cluster, else the ``both_brokers``
    parameter, else the session's main broker (``$ELBERT_TEST_BROKER``)."""
    if EXTERNAL:
        return EXTERNAL
    kind = getattr(request, "param", MAIN_BROKER)
    return str(request.getfixturevalue(f"{kind}_bootstrap"))


@pytest.fixture(scope="session")
def tansu_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of this session's Tansu broker (the external cluster, when one is set)."""
    if EXTERNAL:
        yield EXTERNAL
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
    """``host:port`` of this session's noida-db broker (the external cluster, when one is set)."""
    from elbert_stream.testing.broker import NoidaBroker

    if EXTERNAL:
        yield EXTERNAL
        return
    root = tmp_path_factory.mktemp("noida")
    with NoidaBroker(log_path=root / "noida.log", data_dir=root / "data") as broker:
        yield broker.bootstrap
