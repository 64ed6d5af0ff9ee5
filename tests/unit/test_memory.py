"""stream/memory.py: the malloc arena cap and the trimmer's schedule (the clock is faked; the trim is
glibc's own)."""

from __future__ import annotations

import ctypes.util

import pytest

from elbert_stream.stream.memory import Trimmer, limit_malloc_arenas


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_small_values_never_trim() -> None:
    clock = Clock()
    trimmer = Trimmer(every_bytes=1000, settle_s=0.5, clock=clock)
    for _ in range(10_000):
        trimmer.saw(Trimmer.LARGE_BYTES - 1)
    clock.t += 10
    assert not trimmer.maybe_trim() and trimmer.num_trims == 0


def test_trims_once_enough_large_bytes_passed_and_once_more_after_they_settle() -> None:
    clock = Clock()
    trimmer = Trimmer(every_bytes=3 * Trimmer.LARGE_BYTES, settle_s=0.5, clock=clock)
    trimmer.saw(Trimmer.LARGE_BYTES)
    trimmer.saw(Trimmer.LARGE_BYTES)
    assert not trimmer.maybe_trim()  # 2 of 3 counted, not yet settled
    trimmer.saw(Trimmer.LARGE_BYTES)
    assert trimmer.maybe_trim()  # the bytes threshold
    assert not trimmer.maybe_trim()  # nothing new, not settled
    clock.t += 0.5
    assert trimmer.maybe_trim()  # the settle trim: freed fetch responses of the last ones
    clock.t += 10
    assert not trimmer.maybe_trim() and trimmer.num_trims == 2


@pytest.mark.skipif(not ctypes.util.find_library("c"), reason="needs a C library")
def test_a_trim_runs_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc's malloc_trim is called (and returns) on this machine; the arena cap applies unless the
    operator set MALLOC_ARENA_MAX."""
    clock = Clock()
    trimmer = Trimmer(every_bytes=Trimmer.LARGE_BYTES, clock=clock)
    blob = bytearray(8 * 1024 * 1024)
    trimmer.saw(len(blob))
    del blob
    assert trimmer.maybe_trim() and trimmer.num_trims == 1
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
