"""Bound glibc's malloc arenas before the worker's stage threads start.

glibc gives each thread that allocates under contention an arena of its own (up to 8 per core) and
rarely returns their memory: with the pipeline's four stage threads handling 10 MB values, the
replica's peak RSS grew with every round of large inputs (460 -> 650 -> 764 MB in
``test_hostile_values_compressed_batches_and_10mb_values`` on Tansu; on noida-db, whose fetches
carry more of them at once, 456 -> 732 -> 810 MB even with two arenas; with one: 464 -> 660 -> 676 MB
on Tansu, 462 -> 777 -> 777 MB on noida-db).
``limit_malloc_arenas`` caps them (``mallopt(M_ARENA_MAX)``) unless ``MALLOC_ARENA_MAX`` is set;
a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)
M_ARENA_MAX = -8  # glibc's mallopt parameter
DEFAULT_ARENAS = 1  # 2 still grew by 78 MB a round on noida-db; the cost of one shared arena (malloc
# contention between stage threads) is not yet measured with `bench host`


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Cap glibc malloc arenas for threads created from now on; True when applied."""
    if os.environ.get("MALLOC_ARENA_MAX"):  # the operator's choice wins (read by glibc at start)
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    ok = bool(mallopt(M_ARENA_MAX, arenas))
    log.debug("malloc arenas capped at %d: %s", arenas, ok)
    return ok
