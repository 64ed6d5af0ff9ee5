"""OffsetTracker: the committed offset is the end of the contiguous acked prefix of polled offsets."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from elbert_stream.stream.offsets import OffsetTracker, TopicPartition

TP = TopicPartition("in", 0)


@st.composite
def polled_and_acks(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Strictly increasing polled offsets (with gaps) and a random order acking a random subset."""
    gaps = draw(st.lists(st.integers(1, 4), min_size=1, max_size=60))
    start = draw(st.integers(0, 1000))
    offsets = [start + sum(gaps[:i]) for i in range(len(gaps))]
    acked = draw(st.permutations(offsets))
    cut = draw(st.integers(0, len(acked)))
    return offsets, list(acked[:cut])


def expected_commit(offsets: list[int], acked: set[int]) -> int | None:
    """Reference: the first polled offset not acked (after at least one acked prefix member),
    or last + 1 when everything is acked; None while the first polled offset is unacked."""
    if not offsets or offsets[0] not in acked:
        return None
    for off in offsets:
        if off not in acked:
            return off
    return offsets[-1] + 1


@settings(max_examples=300, deadline=None)
@given(polled_and_acks())
def test_commit_is_end_of_contiguous_acked_prefix(case: tuple[list[int], list[int]]) -> None:
    offsets, acks = case
    tracker = OffsetTracker()
    epochs = {off: tracker.track(TP, off) for off in offsets}
    seen: set[int] = set()
    for off in acks:
        assert tracker.done(TP, off, epochs[off])
        seen.add(off)
        got = tracker.committable(only_new=False).get(TP)
        assert got == expected_commit(offsets, seen)
        if got is not None:  # never beyond an unacked polled offset
            assert all(o in seen for o in offsets if o < got)
    assert tracker.total_pending() == len(offsets) - len(_prefix(offsets, seen))


def _prefix(offsets: list[int], acked: set[int]) -> list[int]:
    out = []
    for off in offsets:
        if off not in acked:
            break
        out.append(off)
    return out


@settings(max_examples=100, deadline=None)
@given(polled_and_acks(), st.integers(0, 60))
def test_interleaved_poll_and_ack(case: tuple[list[int], list[int]], split: int) -> None:
    """Acks may arrive while later offsets are still being polled."""
    offsets, _ = case
    split = min(split, len(offsets))
    tracker = OffsetTracker()
    first = {o: tracker.track(TP, o) for o in offsets[:split]}
    for o in reversed(offsets[:split]):
        tracker.done(TP, o, first[o])
    rest = {o: tracker.track(TP, o) for o in offsets[split:]}
    want = offsets[split] if split < len(offsets) and split else (offsets[-1] + 1 if split else None)
    assert tracker.committable(only_new=False).get(TP) == want
    for o in offsets[split:]:
        tracker.done(TP, o, rest[o])
    assert tracker.committable(only_new=False) == {TP: offsets[-1] + 1}


def test_redelivery_and_stale_acks_are_ignored() -> None:
    tracker = OffsetTracker()
    e0 = tracker.track(TP, 5)
    assert e0 is not None
    assert tracker.track(TP, 5) is None and tracker.track(TP, 3) is None
    assert not tracker.done(TP, 4, e0)  # never polled
    tracker.forget([TP])
    assert not tracker.done(TP, 5, e0)  # revoked: the ack of the old assignment does not count
    e1 = tracker.track(TP, 5)
    assert e1 is not None and e1 != e0
    assert tracker.committable() == {}
    assert tracker.done(TP, 5, e1)
    assert not tracker.done(TP, 5, e1)  # twice
    assert tracker.committable() == {TP: 6}


def test_only_new_after_mark_committed() -> None:
    tracker = OffsetTracker()
    other = TopicPartition("in", 1)
    for tp in (TP, other):
        tracker.done(tp, 0, tracker.track(tp, 0) or 0)
    offsets = tracker.committable()
    assert offsets == {TP: 1, other: 1}
    tracker.mark_committed(offsets)
    assert tracker.committable() == {}
    tracker.done(TP, 1, tracker.track(TP, 1) or 0)
    assert tracker.committable() == {TP: 2}
    assert tracker.committable(only_new=False) == {TP: 2, other: 1}


def test_thread_safety_under_concurrent_acks() -> None:
    tracker = OffsetTracker()
    n = 4000
    epoch = 0
    for off in range(n):
        epoch = tracker.track(TP, off) or 0
    chunks = [list(range(i, n, 4)) for i in range(4)]
    threads = [threading.Thread(target=lambda c=c: [tracker.done(TP, o, epoch) for o in c]) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tracker.committable() == {TP: n}
    assert tracker.total_pending() == 0
