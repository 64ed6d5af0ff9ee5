"""SlotScheduler: FIFO admission, slot and token budgets, backpressure. No model, no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elbert_stream.engine.scheduler import SlotScheduler
from elbert_stream.errors import ConfigError, EngineFailure
from elbert_stream.types import Request


def req(n: int, rid: str | None = None) -> Request:
    return Request(input_ids=[1] * n, request_id=rid or f"n{n}")


def check_invariants(s: SlotScheduler) -> None:
    busy = s.busy_slots()
    assert s.num_busy == len(busy) <= s.max_slots
    assert s.busy_tokens == sum(s.request_in(i).num_tokens for i in busy)  # type: ignore[union-attr]
    assert s.busy_tokens <= s.max_batch_tokens or s.num_busy == 1  # only a lone oversize text may exceed


# one op: ("add", length) | ("schedule", 0) | ("free", k-th busy slot)
ops = st.lists(st.one_of(st.tuples(st.just("add"), st.integers(1, 60)),
                         st.tuples(st.just("schedule"), st.just(0)),
                         st.tuples(st.just("free"), st.integers(0, 10))), max_size=80)


@settings(max_examples=200, deadline=None)
@given(ops=ops, max_slots=st.integers(1, 6), budget=st.integers(8, 150), max_queue=st.integers(1, 8),
       admit_when_empty=st.booleans())
def test_random_interleavings_keep_fifo_budgets_and_slots(
    ops: list[tuple[str, int]], max_slots: int, budget: int, max_queue: int, admit_when_empty: bool
) -> None:
    s = SlotScheduler(max_slots, budget, max_queue, admit_when_empty=admit_when_empty)
    accepted: list[str] = []
    admitted: list[str] = []
    finished: list[str] = []
    for i, (op, arg) in enumerate(ops):
        if op == "add":
            was_full = s.num_waiting >= max_queue
            ok = s.add(req(arg, f"r{i}"))
            assert ok is not was_full  # False exactly when the queue was full
            if ok:
                accepted.append(f"r{i}")
        elif op == "schedule":
            was_busy = s.num_busy
            got = s.schedule()
            if admit_when_empty and was_busy:
                assert got == []
            admitted += [a.request.request_id for a in got]
            assert all(s.request_in(a.slot) is a.request for a in got)
        elif s.num_busy:
            slot = s.busy_slots()[arg % s.num_busy]
            finished += [r.request_id for r in s.free([slot])]
        check_invariants(s)
    while s.has_work():  # drain: everything accepted is served, in FIFO order
        admitted += [a.request.request_id for a in s.schedule()]
        check_invariants(s)
        finished += [r.request_id for r in s.free(s.busy_slots())]
    assert admitted == accepted
    assert sorted(finished) == sorted(accepted)
    assert s.num_busy == 0 and s.busy_tokens == 0  # no slot or token leak


def test_fifo_stops_at_first_request_that_does_not_fit() -> None:
    s = SlotScheduler(max_slots=4, max_batch_tokens=100, max_queue=10)
    for r in (req(60, "a"), req(50, "b"), req(10, "c")):
        assert s.add(r)
    assert [a.request.request_id for a in s.schedule()] == ["a"]  # b does not fit; c must not overtake it
    assert s.num_waiting == 2
    s.free([0])
    assert [a.request.request_id for a in s.schedule()] == ["b", "c"]


def test_oversize_text_is_served_alone_not_starved() -> None:
    s = SlotScheduler(max_slots=4, max_batch_tokens=50, max_queue=10)
    s.add(req(10, "small"))
    s.add(req(80, "huge"))
    s.add(req(10, "after"))
    assert [a.request.request_id for a in s.schedule()] == ["small"]
    s.free(s.busy_slots())
    got = s.schedule()
    assert [a.request.request_id for a in got] == ["huge"] and s.busy_tokens == 80  # alone, over budget
    assert s.schedule() == []  # nothing joins it
    s.free(s.busy_slots())
    assert [a.request.request_id for a in s.schedule()] == ["after"]


def test_slot_limit_and_lowest_free_slot_first() -> None:
    s = SlotScheduler(max_slots=3, max_batch_tokens=1000, max_queue=10)
    for i in range(5):
        s.add(req(5, f"r{i}"))
    assert [a.slot for a in s.schedule()] == [0, 1, 2]
    s.free([1])
    assert [(a.slot, a.request.request_id) for a in s.schedule()] == [(1, "r3")]


def test_queue_full_reports_false_and_recovers() -> None:
    s = SlotScheduler(max_slots=1, max_batch_tokens=100, max_queue=2)
    assert s.add(req(5)) and s.add(req(5))
    assert s.queue_full and not s.add(req(5))
    s.schedule()
    assert s.add(req(5))


def test_admit_when_empty_waits_for_the_whole_batch() -> None:
    s = SlotScheduler(max_slots=2, max_batch_tokens=100, max_queue=10, admit_when_empty=True)
    for i in range(4):
        s.add(req(5, f"r{i}"))
    assert len(s.schedule()) == 2
    s.free([0])
    assert s.schedule() == []  # one slot free, but the batch is not done
    s.free([1])
    assert [a.request.request_id for a in s.schedule()] == ["r2", "r3"]


def test_timestamps() -> None:
    s = SlotScheduler(max_slots=1, max_batch_tokens=100, max_queue=10)
    r = req(5)
    s.add(r)
    s.schedule(now_s=r.arrival_s + 1.0)
    assert r.admitted_s == r.arrival_s + 1.0 and r.finished_s is None
    (done,) = s.free([0], now_s=r.arrival_s + 3.0)
    assert done is r and r.finished_s == r.arrival_s + 3.0


def test_errors() -> None:
    with pytest.raises(ConfigError, match="max_slots must be >= 1, got 0"):
        SlotScheduler(0, 10, 10)
    s = SlotScheduler(2, 10, 10)
    with pytest.raises(EngineFailure, match="slot 1 is not busy"):
        s.free([1])


def test_scheduler_imports_no_torch() -> None:
    code = "import sys, elbert_stream.engine.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
