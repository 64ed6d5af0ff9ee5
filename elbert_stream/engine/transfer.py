"""Host <-> device transfers of the engine step: pinned staging for uploads, one explicit read.

``DeviceLink(device)``:

* ``upload(array)``: a numpy int64 array -> a device tensor. On CUDA the array is copied into a pinned
  staging buffer and sent with ``non_blocking=True`` (a truly asynchronous copy; from pageable memory
  it is not). The buffers form a ring of ``RING`` entries. A staging buffer may be overwritten only
  once its copy has run; the engine makes at most ``RING - 1`` uploads between two blocking reads,
  and every read waits for all earlier work on the stream, so a reused buffer is always free.
* ``read(tensor)``: the step's device-to-host read, and the ONLY place the engine waits for the
  device: on CUDA an async copy into a pinned buffer, then an event wait. Being explicit, it is not
  flagged by ``torch.cuda.set_sync_debug_mode("error")``, which catches every implicit sync
  (``.item()``, ``.cpu()``, pageable copies, ``torch.tensor(..., device=...)``) in a step.

On CPU both are zero-copy (``torch.from_numpy`` / ``.numpy()``). ``read`` returns a fresh numpy array.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

RING = 8


def pack_admissions(slots: list[int], ids: list[Any], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One int64 array for one upload: slots ``[A]``, lengths ``[A]``, right-padded ids ``[A, Tn]``
    (Tn = the longest); also returns the lengths. ``ids`` rows are lists or int64 arrays."""
    n = len(slots)
    lens = np.array([len(r) for r in ids], dtype=np.int64)  # [A]
    width = int(lens.max())
    packed = np.full(2 * n + n * width, pad_id, dtype=np.int64)
    packed[:n] = slots
    packed[n:2 * n] = lens
    grid = packed[2 * n:].reshape(n, width)
    for i, row in enumerate(ids):
        grid[i, : lens[i]] = row
    return packed, lens


class DeviceLink:
    """Uploads and the explicit read for one device (see the module docstring for the contract)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._ring: list[torch.Tensor | None] = [None] * RING
        self._next = 0
        self._read_bufs: dict[torch.dtype, torch.Tensor] = {}
        self.num_reads = 0  # explicit device->host reads so far (tests count them per step)

    def upload(self, array: np.ndarray) -> torch.Tensor:
        """``array`` (int64, any shape) on the device; the caller must not keep the array's memory."""
        src = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        if not self.cuda:
            return src
        n, i = src.numel(), self._next
        self._next = (i + 1) % RING
        buf = self._ring[i]
        if buf is None or buf.numel() < n:
            buf = self._ring[i] = torch.empty(max(n, 1024), dtype=torch.long, pin_memory=True)
        staged = buf[:n].view(src.shape)
        staged.copy_(src)
        return staged.to(self.device, non_blocking=True)

    def read(self, tensor: torch.Tensor) -> np.ndarray:
        """``tensor`` on the host as numpy (a copy), after the device finished everything before it."""
        self.num_reads += 1
        if not self.cuda:
            return tensor.detach().numpy().copy()
        buf = self._read_bufs.get(tensor.dtype)
        if buf is None or buf.numel() < tensor.numel():
            buf = torch.empty(max(tensor.numel(), 4096), dtype=tensor.dtype, pin_memory=True)
            self._read_bufs[tensor.dtype] = buf
        host = buf[: tensor.numel()].view(tensor.shape)
        host.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return host.numpy().copy()
