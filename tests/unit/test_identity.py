"""A worker's identity (stream/identity.py): stable across restarts, never held by two live workers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from elbert_stream.stream.identity import claim_local_slot, serve_identity, transactional_id


def test_two_live_workers_on_one_host_get_different_slots_and_a_release_is_reused(tmp_path: Path) -> None:
    a = claim_local_slot("g", host="h", directory=tmp_path)
    b = claim_local_slot("g", host="h", directory=tmp_path)
    assert (a.identity, b.identity) == ("h-0", "h-1")
    assert claim_local_slot("other group", host="h", directory=tmp_path).identity == "h-0"
    a.release()
    c = claim_local_slot("g", host="h", directory=tmp_path)
    assert c.identity == "h-0"  # a restart takes the freed identity back
    b.release()
    c.release()


def test_a_sigkilled_workers_slot_is_free_for_its_restart(tmp_path: Path) -> None:
    """The kernel drops the lock of a killed process: the restart gets the same identity, so its
    transactional id fences the dead one's (the old default, <host>-<pid>, was new on every start)."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from elbert_stream.stream.identity import claim_local_slot
        slot = claim_local_slot("g", host="h", directory=Path({str(tmp_path)!r}))
        print(slot.identity, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "h-0"
        assert claim_local_slot("g", host="h", directory=tmp_path).identity == "h-1"  # held by the child
    finally:
        proc.kill()
        proc.wait()
    assert claim_local_slot("g", host="h", directory=tmp_path).identity == "h-0"


def test_serve_identity_is_the_rank_and_names_the_transactional_id() -> None:
    assert serve_identity("grp", 3) == "grp-r3"
    assert transactional_id("elbert-stream", serve_identity("grp", 3)) == "elbert-stream-grp-r3"
