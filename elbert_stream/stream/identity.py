"""A worker's Kafka identity: the static member id and the transactional id, stable across restarts
and never held by two live workers at once.

Why it matters (exactly_once): a replacement that starts with the SAME ``transactional.id`` aborts the
dead worker's open transaction at once (``init_transactions``) and fences it; with a new id that
transaction stays open until the broker's ``transaction_timeout_ms``, and every ``read_committed``
reader of the output waits at its last stable offset meanwhile (some brokers never time it out).

* Under Ray Serve: the replica's rank (Serve keeps ranks unique among live replicas and gives a
  freed rank to the next replica it starts): ``serve_identity`` -> ``"<group>-r<rank>"``. A replica
  whose rank Serve re-packs restarts its worker under the new identity (``serve/deployment.py``).
* ``elbert-stream run`` without ``--replica-id``: ``"<host>-<slot>"``, the lowest slot of this host
  whose lock file this process can lock (``claim_local_slot``). The kernel releases the lock when the
  process dies, even by SIGKILL, so a restart on the same host takes the dead one's slot back, and a
  second live process on the host gets the next slot. In a container the host is the pod name:
  stable for a StatefulSet, new for each pod of a Deployment (name the replica then, or use Serve).
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import IO

from elbert_stream.errors import ConfigError

MAX_SLOTS = 256


def transactional_id(prefix: str, identity: str) -> str:
    """The producer's ``transactional.id`` for a worker of this identity."""
    return f"{prefix}-{identity}"


def serve_identity(group_id: str, rank: int) -> str:
    """A Serve replica's identity: unique among live replicas, reused by the replica that replaces it."""
    return f"{group_id}-r{rank}"


def lock_dir() -> Path:
    """Where slot locks live: ``$ELBERT_LOCK_DIR``, else ``$XDG_RUNTIME_DIR/elbert-stream``, else the
    temp dir's ``elbert-stream`` (read at the edge, by the CLI)."""
    base = os.environ.get("ELBERT_LOCK_DIR") or os.path.join(
        os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(), "elbert-stream")
    return Path(base)


class SlotLock:
    """A held slot: ``identity`` is ``"<host>-<slot>"``; the lock lasts until ``release`` or exit."""

    def __init__(self, identity: str, handle: IO[str]) -> None:
        self.identity = identity
        self._handle: IO[str] | None = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None


def claim_local_slot(group_id: str, *, host: str | None = None, directory: Path | None = None) -> SlotLock:
    """Lock the lowest free slot of ``group_id`` on this host (see module doc)."""
    host = host or socket.gethostname()
    directory = directory or lock_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the lock dir {directory} for the worker's identity ({e}); set "
                          "ELBERT_LOCK_DIR to a writable dir, or name the worker with --replica-id") from e
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", group_id)
    for slot in range(MAX_SLOTS):
        handle = open(directory / f"{safe}-{slot}.lock", "a+", encoding="utf-8")  # noqa: SIM115 - held
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return SlotLock(f"{host}-{slot}", handle)
    raise ConfigError(f"{MAX_SLOTS} workers of group {group_id!r} already run on this host ({directory}); "
                      "name this one with --replica-id")
