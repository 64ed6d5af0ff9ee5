"""Bound glibc's malloc arenas before the worker's stage threads start.

glibc gives each thread that allocates under contention an arena of its own (up to 8 per core) and
rarely returns their memory: with the pipeline's four stage threads handling 10 MB values, the
replica's peak RSS grew with every round of large inputs. Rounds of eleven 10 MB values through one
``elbert-stream run`` (peak RSS after each, MB; docs/streaming.md "Hostile input"):
8 arenas, Tansu 445 -> 606 -> 645 -> 692 -> 730 -> 749 (every round adds); 1 arena, Tansu
443 -> 661 -> 671 -> 671 -> 681 -> 681, noida-db 443 -> 739 -> 1005 -> 1005 -> 1005 -> 1005 (bounded;
noida-db's fetches carry the whole backlog, quirk ``fetch_limits_ignored``).
``limit_malloc_arenas`` caps them (``mallopt(M_ARENA_MAX)``) unless ``MALLOC_ARENA_MAX`` is set;
a no-op off glibc.

Even in one arena, freed 10 MB buffers (kafka-python's fetch response, the decoded values) leave
holes that stay resident, and the peak crept up a few MB a round (444 -> 677 -> 677 -> 691 -> 691 ->
710 -> 710 -> 710 -> 710 -> 725 -> 730 MB over ten rounds on Tansu). ``Trimmer`` hands their pages
back (``malloc_trim``) after large records passed. A fixed ``M_MMAP_THRESHOLD`` would do it too (flat
at 664 MB) but costs the engine about 20 % (83 -> 68 msg/s, shipped model on CPU: its activations
then come from fresh mappings every step), so it is not used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
M_ARENA_MAX = -8  # glibc's mallopt parameter
DEFAULT_ARENAS = 1  # 2 still grew by 78 MB a round on noida-db. Not a throughput cost: the instant-engine
# Worker of `bench host --rounds 2` did 11.7 k / 8.3 k msg/s with one arena, 6.9 k / 5.5 k with 8


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Cap glibc malloc arenas for threads created from now on; True when applied."""
    if os.environ.get("MALLOC_ARENA_MAX"):  # the operator's choice wins (read by glibc at start)
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc
        return False
    ok = bool(mallopt(M_ARENA_MAX, arenas))
    log.debug("malloc arenas capped at %d: %s", arenas, ok)
    return ok


class Trimmer:
    """Return freed pages to the OS after large records went through the intake.

    ``saw(nbytes)`` counts the bytes of large values polled; ``maybe_trim()`` (each intake iteration)
    calls ``malloc_trim(0)`` once ``every_bytes`` were counted, and once more ``settle_s`` after the
    last of them (kafka-python frees a fetch response when a later poll drains it). Inactive off glibc.
    """

    LARGE_BYTES = 256 * 1024  # values at least this large are counted (smaller ones reuse freed space)

    def __init__(self, every_bytes: int = 8 * 1024 * 1024, settle_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        libc = _libc()
        self._trim = getattr(libc, "malloc_trim", None)
        self.every_bytes, self.settle_s, self.clock = every_bytes, settle_s, clock
        self._pending = 0
        self._settle_at: float | None = None
        self.num_trims = 0

    def saw(self, nbytes: int) -> None:
        if nbytes >= self.LARGE_BYTES:
            self._pending += nbytes
            self._settle_at = self.clock() + self.settle_s

    def maybe_trim(self) -> bool:
        """Trim when due; True when it did."""
        if self._pending >= self.every_bytes:
            self._pending = 0
        elif self._settle_at is not None and self.clock() >= self._settle_at:
            self._settle_at, self._pending = None, 0
        else:
            return False
        if self._trim is not None:
            self._trim(0)
        self.num_trims += 1
        return True
