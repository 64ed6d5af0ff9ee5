"""One test per private kafka-python internal that ``stream/kafka_internals.py`` reaches, pinning the
shape it was written for; the integration tests exercise the same calls against real brokers. When
kafka-python moves past ``TESTED``, these say which use to re-check."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import kafka
import pytest
from kafka import TopicPartition as KTopicPartition
from kafka.consumer.subscription_state import SubscriptionState, TopicPartitionState
from kafka.coordinator.consumer import ConsumerCoordinator
from kafka.producer.sender import Sender
from kafka.producer.transaction_manager import TransactionManager

from elbert_stream.stream import kafka_internals as ki


def version() -> tuple[int, int]:
    major, minor = kafka.__version__.split(".")[:2]
    return int(major), int(minor)


def test_installed_kafka_python_is_the_tested_range() -> None:
    low, high = ki.TESTED
    assert low <= version() < high, f"kafka-python {kafka.__version__}: re-check stream/kafka_internals.py"


def test_the_pyproject_pin_matches_the_tested_range() -> None:
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    pin = next(d for d in deps["project"]["dependencies"] if d.startswith("kafka-python"))
    low, high = ki.TESTED
    assert f">={low[0]}.{low[1]}" in pin and f"<{high[0]}.{high[1]}" in pin, pin


def test_coordinator_commit_coroutine() -> None:
    fn = ConsumerCoordinator._commit_offsets_sync_async
    assert inspect.iscoroutinefunction(fn)
    assert list(inspect.signature(fn).parameters) == ["self", "offsets", "timeout_ms"]

    class Coordinator:
        seen: list[Any] = []

        async def _commit_offsets_sync_async(self, offsets: Any, timeout_ms: Any = None) -> None:
            self.seen.append((offsets, timeout_ms))

    consumer: Any = type("C", (), {"_coordinator": Coordinator()})()
    asyncio.run(ki.commit_offsets_on_io_thread(consumer, {"tp": "offset"}, 5000))  # type: ignore[dict-item]
    assert Coordinator.seen == [({"tp": "offset"}, 5000)]


def test_subscription_state_fields_for_a_fresh_fetch_state() -> None:
    subs = SubscriptionState()
    assert hasattr(subs._lock, "__enter__")
    assert isinstance(subs.assignment, dict)
    state = TopicPartitionState()
    assert state.paused is False and not state.has_valid_position  # next poll fetches the committed offset
    ktp = KTopicPartition("t", 0)
    old = TopicPartitionState()
    old.paused = True
    old.seek(42)
    subs.assignment[ktp] = old
    consumer: Any = type("C", (), {"_subscription": subs})()
    ki.refetch_from_committed(consumer, ktp)
    fresh = subs.assignment[ktp]
    assert fresh is not old and fresh.paused and not fresh.has_valid_position


@pytest.mark.parametrize("name, params", [
    ("send_offsets_to_transaction", ["self", "offsets", "group_metadata"]),
    ("begin_commit", ["self"]),
])
def test_transaction_manager_requests(name: str, params: list[str]) -> None:
    assert list(inspect.signature(getattr(TransactionManager, name)).parameters) == params


def test_sender_wakeup() -> None:
    assert list(inspect.signature(Sender.wakeup).parameters) == ["self"]


def test_adapter_calls_the_transaction_manager_and_sender() -> None:
    calls: list[tuple[str, Any]] = []
    tm = type("TM", (), {
        "send_offsets_to_transaction": lambda self, o, g: calls.append(("offsets", (o, g))) or 1,
        "begin_commit": lambda self: calls.append(("commit", None)) or 2,
    })()
    sender = type("S", (), {"wakeup": lambda self: calls.append(("wakeup", None))})()
    producer: Any = type("P", (), {"_transaction_manager": tm, "_sender": sender})()
    assert ki.send_offsets_to_transaction(producer, {}, "group") == 1
    assert ki.commit_transaction(producer) == 2
    ki.wake_sender(producer)
    assert calls == [("offsets", ({}, "group")), ("commit", None), ("wakeup", None)]


def test_joining_group_reads_the_coordinator_rejoin_flags() -> None:
    assert inspect.signature(ConsumerCoordinator.need_rejoin).parameters.keys() == {"self"}
    join = inspect.getsource(kafka.coordinator.base.BaseCoordinator.join_group_async)
    assert "self.rejoining = True" in join

    class Coordinator:
        def __init__(self, rejoin: bool, rejoining: bool) -> None:
            self.rejoin, self.rejoining = rejoin, rejoining

        def need_rejoin(self) -> bool:
            return self.rejoin

    class Consumer:
        def __init__(self, rejoin: bool, rejoining: bool) -> None:
            self._coordinator = Coordinator(rejoin, rejoining)

    assert ki.joining_group(Consumer(True, False))  # type: ignore[arg-type]  # must join
    assert ki.joining_group(Consumer(False, True))  # type: ignore[arg-type]  # a join under way
    assert not ki.joining_group(Consumer(False, False))  # type: ignore[arg-type]  # stable


def test_join_group_still_replaces_a_finished_join_task() -> None:
    """The kafka-python behaviour ``joining_group`` works around: a join task found done on the next
    poll is replaced by a new one (its answer dropped). When this fails, the workaround may be moot."""
    src = inspect.getsource(kafka.coordinator.base.BaseCoordinator.join_group_async)
    assert "if self._join_task is None or self._join_task.is_done:" in src


def test_a_member_without_an_assignment_for_too_long_fails_health(monkeypatch: pytest.MonkeyPatch) -> None:
    """KafkaSource.stuck_joining: no assignment since the start or the last revoke for longer than
    3 session timeouts + 30 s (seen on noida-db: a static member restarted after a drain joins,
    is revoked, and its next join is never answered, while kafka-python still lists the revoked
    partitions and reports no rejoin needed)."""
    from elbert_stream.config import KafkaSettings
    from elbert_stream.stream import source as source_module
    from elbert_stream.stream.source import KafkaSource

    now = [1000.0]
    monkeypatch.setattr(source_module.time, "monotonic", lambda: now[0])
    src = object.__new__(KafkaSource)
    src.settings = KafkaSettings(session_timeout_ms=6000, group_id="g", group_instance_id="g-r0")
    src.rebalancing_since = now[0]
    now[0] += 47.0
    assert src.stuck_joining() is None  # within 3 x 6 s + 30 s
    now[0] += 2.0
    text = src.stuck_joining()
    assert text is not None and "no assignment for 49s" in text and "'g'" in text and "g-r0" in text
    src.rebalancing_since = None  # an assignment came (even an empty one)
    assert src.stuck_joining() is None


def test_leave_group_on_close_makes_a_static_member_leave() -> None:
    """kafka-python decides whether ``close()`` sends LeaveGroup with ``is_dynamic_member()`` (static
    members never leave); the adapter shadows it on the instance, so the LeaveGroup it sends names the
    member id and the instance id (``maybe_leave_group_async``'s request)."""
    from kafka.coordinator.base import BaseCoordinator

    source = inspect.getsource(BaseCoordinator.maybe_leave_group_async)
    assert "self.is_dynamic_member()" in source and "group_instance_id=self.group_instance_id" in source
    assert "self.maybe_leave_group(" in inspect.getsource(BaseCoordinator.close)

    class Coordinator:
        group_instance_id = "static-0"
        config = {"api_version": (3, 0)}
        is_dynamic_member = BaseCoordinator.is_dynamic_member

    coordinator = Coordinator()
    assert coordinator.is_dynamic_member() is False
    ki.leave_group_on_close(type("C", (), {"_coordinator": coordinator})())  # type: ignore[arg-type]
    assert coordinator.is_dynamic_member() is True


def test_no_busy_send_loop_waits_on_a_connected_node_and_keeps_the_backoff_of_others() -> None:
    from types import SimpleNamespace

    # the sender takes a node's delay from its client when the node cannot take a request
    assert "self._client.connection_delay(node)" in inspect.getsource(Sender._send_producer_data)
    real = kafka.KafkaProducer(bootstrap_servers="127.0.0.1:9", api_version=(3, 9), metrics_enabled=False)
    try:
        assert isinstance(real._sender._client._manager._conns, dict)
        ki.no_busy_send_loop(real)  # applies to the real object graph
    finally:
        real.close(timeout=0)
    conns = {1: SimpleNamespace(connected=True), 2: SimpleNamespace(connected=False)}
    client = SimpleNamespace(_manager=SimpleNamespace(_conns=conns), connection_delay=lambda node: 0.25)
    ki.no_busy_send_loop(SimpleNamespace(_sender=SimpleNamespace(_client=client)))  # type: ignore[arg-type]
    assert client.connection_delay(1) == ki.SENDER_WAIT_MS, "connected and full: wait for a response"
    assert client.connection_delay(2) == 0.25 and client.connection_delay(3) == 0.25, "reconnect backoff kept"
