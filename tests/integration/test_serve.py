"""Ray Serve + Tansu, for real: every input offset comes back exactly once as an output record or a
dead letter (read back from the topics), through replica sharing, a killed replica, scaling, bad
input, live reconfiguration, a dying worker, and the HTTP API.

The session's broker (conftest) and one local Ray (2 CPUs) per module; each test has its own
topics, group and app.
Duplicates (at-least-once redelivery after a failure) are printed, never silently accepted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_support import (
    LABELS,
    SESSION_TIMEOUT_MS,
    TINY_LAYERS,
    Stream,
    report,
    shutdown_ray_leaving_no_refs,
    texts,
)

from elbert_stream.serve import local
from elbert_stream.stream.source import join_bound_s
from elbert_stream.testing.broker import free_port
from examples.demo import DEMO_MAX_MESSAGE_BYTES, bad_inputs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]  # a deploy each: 30-60 s


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    port = free_port()
    local.start_local_ray(2, http_port=port, log_to_driver=bool(os.environ.get("ELBERT_TEST_RAY_LOGS")))
    yield port
    shutdown_ray_leaving_no_refs()


@pytest.fixture
def stream(kafka_bootstrap: str, tiny_model_dir: Path, http_port: int) -> Iterator[Stream]:
    s = Stream(kafka_bootstrap, tiny_model_dir, http_port=http_port)
    yield s
    s.delete()


# a replica that cannot join is failed by its health check (join_bound_s) and replaced; its
# replacement's cold start took up to 19 s on this box, 45 s allowed
JOIN_OR_REPLACE_S = join_bound_s(SESSION_TIMEOUT_MS) + 45


def wait_assigned(s: Stream, num_replicas: int) -> set[str]:
    return local.wait_until_consuming(s.name, s.http_port, s.route, num_replicas=num_replicas,
                                      timeout_s=JOIN_OR_REPLACE_S)


def block_ports(n: int) -> tuple[list[socket.socket], int]:
    """Listen on ``n`` consecutive loopback ports; returns the sockets and the first port."""
    for _ in range(50):
        first, socks = free_port(), []
        try:
            for p in range(first, first + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
                sock.listen()
            return socks, first
        except OSError:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def replica_ids(acc) -> set[str]:  # type: ignore[no-untyped-def]
    return {o.replica_id for recs in acc.outputs.values() for o in recs}


def test_two_replicas_share_four_partitions(stream: Stream) -> None:
    stream.deploy(2)
    owners = wait_assigned(stream, 2)
    stream.produce(texts(300, "share"), rate_per_s=200)
    acc = stream.wait_all(60)
    report("2 replicas / 4 partitions", acc)
    assert not acc.lost, f"lost {len(acc.lost)}: {acc.lost[:5]}"
    assert acc.num_duplicates == 0 and acc.strays == 0 and not acc.dead_letters
    assert replica_ids(acc) == owners


def test_replica_killed_mid_stream_loses_nothing(stream: Stream) -> None:
    stream.deploy(2)
    wait_assigned(stream, 2)
    producer = stream.produce_in_background(texts(600, "kill"), rate_per_s=100)
    with stream.reader() as r:
        r.poll_until(lambda rd: rd.count(stream.output) >= 150, 30)
    victim = local.replica_actor_names(stream.name)[0]
    local.kill_replica(victim)
    producer.join(30)
    acc = stream.wait_all(120)
    report(f"killed {victim.rsplit('#', 1)[-1]} mid-stream", acc)
    assert len(stream.sent) == 600
    assert not acc.lost, f"lost {len(acc.lost)} after ray.kill: {acc.lost[:5]}"
    assert not acc.dead_letters and acc.strays == 0
    assert len(replica_ids(acc)) >= 2


def test_exactly_once_replica_killed_resumes_within_the_session_timeout(noida_bootstrap: str,
                                                                      tiny_model_dir: Path,
                                                                      http_port: int) -> None:
    """exactly_once under Serve, on noida-db (hides aborted records; never expires a dead member nor
    times out an abandoned transaction, so only the replacement's identity can unblock anything).
    SIGKILL-equivalent ray.kill of a replica mid-transaction: its replacement takes the same rank,
    hence the same static member id and transactional id (stream/identity.py), aborts the open
    transaction and takes the partitions back. Measured: the time until read_committed readers see
    new output on EVERY output partition; target the session timeout + 10 s; 0 lost, 0 duplicates."""
    s = Stream(noida_bootstrap, tiny_model_dir, http_port=http_port)
    try:
        # static membership: noida-db keeps a dead dynamic member (and its partitions) for good
        s.deploy(2, delivery="exactly_once", group_instance_id=f"{s.name}-m")
        wait_assigned(s, 2)
        producer = s.produce_in_background(texts(900, "eoskill"), rate_per_s=60)
        with s.reader("read_committed") as r:
            assert r.poll_until(lambda rd: rd.count(s.output) >= 150, 60)
            victim = local.replica_actor_names(s.name)[0]
            local.kill_replica(victim)
            killed = time.time()

            def fresh(rd: Any) -> dict[int, float]:  # output partition -> first arrival of a post-kill record
                first: dict[int, float] = {}
                for rec in rd.records[s.output]:
                    if rec.timestamp_ms > killed * 1000 and rec.partition not in first:
                        first[rec.partition] = rec.read_s
                return first

            assert r.poll_until(lambda rd: len(fresh(rd)) == 4, 120), fresh(r)
            stall_s = max(fresh(r).values()) - killed
        producer.join(60)
        acc = s.wait_all(120, isolation_level="read_committed")
    finally:
        s.delete()
    tag = victim.rsplit("#", 1)[-1]
    old = {o.replica_id for recs in acc.outputs.values() for o in recs if o.produced_ms < killed * 1000}
    first_new = min(o.produced_ms for recs in acc.outputs.values() for o in recs if o.replica_id not in old)
    start_s = first_new / 1000 - killed  # the replacement's cold start: Ray worker, imports, model, join
    report(f"exactly_once, killed {tag}: the replacement answered {start_s:.1f}s after the kill; "
           f"read_committed readers saw every output partition flow again after {stall_s:.1f}s", acc)
    assert not acc.lost, f"lost {len(acc.lost)}: {acc.lost[:5]}"
    assert acc.num_duplicates == 0 and acc.strays == 0 and not acc.dead_letters
    # readers wait for the replacement, not for a transaction timeout (noida-db has none): what is
    # ours (abort the open transaction, rejoin, commit) takes at most the session timeout past its
    # start; the start itself (4-11 s on this 2-core box) is Ray's and the image's
    assert stall_s - start_s <= 6.0, (stall_s, start_s)
    assert stall_s <= 6.0 + 10.0 + max(0.0, start_s - 10.0), f"read_committed readers stalled {stall_s:.1f}s"


def test_scale_two_one_two_loses_nothing(stream: Stream) -> None:
    stream.deploy(2)
    wait_assigned(stream, 2)
    producer = stream.produce_in_background(texts(1200, "scale"), rate_per_s=60)
    time.sleep(4)
    stream.deploy(1)  # graceful: the stopped replica drains and commits
    assert len(local.replica_actor_names(stream.name)) == 1
    time.sleep(6)
    stream.deploy(2)
    assert len(local.replica_actor_names(stream.name)) == 2
    producer.join(60)
    # the re-added replica may join after the first stream ended (a loaded machine, Tansu's slow
    # rebalances): once both consume, a second stream reaches both
    wait_assigned(stream, 2)
    stream.produce_in_background(texts(120, "again"), rate_per_s=60).join(60)
    acc = stream.wait_all(150)
    report("scale 2 -> 1 -> 2", acc)
    assert len(stream.sent) == 1320
    assert not acc.lost, f"lost {len(acc.lost)} while scaling: {acc.lost[:5]}"
    assert not acc.dead_letters and acc.strays == 0
    assert len(replica_ids(acc)) >= 3


def test_bad_input_mix_is_dead_lettered_and_the_stream_goes_on(stream: Stream) -> None:
    stream.deploy(1, input_format="json", max_message_bytes=DEMO_MAX_MESSAGE_BYTES)
    good = [json.dumps({"text": t.decode(), "id": i}).encode() for i, t in enumerate(texts(40, "good"))]
    bad = bad_inputs()
    huge = b"y" * 1_500_000  # bigger than the producer's default max request: must still be dead-lettered
    values = good[:20] + [b.value for b in bad] + [huge] + good[20:]
    sent = stream.produce(values)
    acc = stream.wait_all(60)
    report("bad input mix", acc)
    assert not acc.lost and acc.num_duplicates == 0 and acc.strays == 0
    expected = {sent[20 + i].position: b.reason for i, b in enumerate(bad)}
    expected[sent[20 + len(bad)].position] = "too_large"
    got = {pos: recs[0].headers["elbert.reason"] for pos, recs in acc.dead_letters.items()}
    assert got == expected
    assert len(acc.outputs) == len(good)
    assert {o.id for recs in acc.outputs.values() for o in recs} == set(range(len(good)))


def test_reconfigure_changes_exit_depths_live_and_http(stream: Stream) -> None:
    stream.deploy(1, user_config={"exit": {"policy": "none"}})
    wait_assigned(stream, 1)
    first = stream.produce(texts(40, "before"))
    acc = stream.wait_all(60, sent=first)
    assert not acc.lost
    assert {o.exit_depth for recs in acc.outputs.values() for o in recs} == {TINY_LAYERS}
    before = set(local.replica_actor_names(stream.name))

    stream.deploy(1, user_config={"exit": {"policy": "entropy", "tau": 1.0}})
    assert set(local.replica_actor_names(stream.name)) == before, "reconfigure must not restart"
    code, stats = stream.http("GET", "/stats")
    assert code == 200 and stats["exit"]["policy"] == "entropy" and stats["worker"]["alive"]
    second = stream.produce(texts(40, "after"))
    acc = stream.wait_all(60, sent=second)
    assert not acc.lost
    assert {o.exit_depth for recs in acc.outputs.values() for o in recs} == {1}

    code, body = stream.http("POST", "/classify", {"texts": ["shares rose", "the match ended 2-1"]})
    assert code == 200, body
    assert [p["exit_depth"] for p in body["predictions"]] == [1, 1]
    assert all(p["label"] in LABELS for p in body["predictions"])
    assert stream.http("POST", "/classify", {"texts": []})[0] == 422
    assert stream.http("POST", "/classify", {"texts": ["ok", "  "]})[0] == 400
    assert stream.http("GET", "/healthz")[0] == 200


def test_dead_worker_fails_health_check_and_is_replaced(stream: Stream) -> None:
    """A worker that cannot start (its metrics port is taken) fails the health check; Serve keeps
    replacing the replica; once the port is free a replacement processes everything."""
    blockers, port = block_ports(4)  # the metrics port is offset by the replica's local rank (< 4 here)
    overrides = stream.overrides()
    overrides["telemetry"] = {"prometheus_port": port}
    local.run_local_app(overrides, name=stream.name, num_replicas=1, num_cpus=0.5,
                             route_prefix=stream.route, wait=False)
    stream.produce(texts(50, "health"))
    try:
        seen, deadline, unhealthy = set(), time.monotonic() + 60, None
        while time.monotonic() < deadline and (len(seen) < 2 or unhealthy is None):
            seen |= set(local.replica_actor_names(stream.name))
            code, body = stream.http("GET", "/healthz")
            if code == 503 and isinstance(body, dict):
                unhealthy = body["detail"]
            time.sleep(0.3)
        assert unhealthy is not None and "Prometheus" in unhealthy and "in use" in unhealthy, unhealthy
        assert len(seen) >= 2, f"Serve did not replace the replica whose worker died: {seen}"
    finally:
        for b in blockers:
            b.close()
    acc = stream.wait_all(90)
    report("dead worker replaced", acc)
    assert not acc.lost
