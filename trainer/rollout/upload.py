"""Small host-to-device uploads that never make the host wait for the GPU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


class Uploader:
    """Host lists to device tensors in one copy per call, through a ring of pinned buffers.

    The copy is asynchronous: a buffer is reused only after the copy that last read it finished (an
    event per ring entry), so filling it never races the device, and the host never waits for the
    decode step in flight. Calls larger than the buffers fall back to a one-off pinned copy.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, capacity: int, ring: int = 8) -> None:
        self.device, self.dtype = device, dtype
        self.np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self.cuda = device.type == "cuda"
        self.bufs = (
            [torch.empty(capacity, dtype=dtype, pin_memory=True) for _ in range(ring)] if self.cuda else []
        )
        self.events: list[torch.cuda.Event | None] = [None] * ring
        self.next = 0

    def upload(self, *lists: Sequence[Any] | np.ndarray) -> list[Tensor]:
        """One device tensor per list (or 1-d array), in one host-to-device copy."""
        sizes = [len(v) for v in lists]
        host = torch.from_numpy(np.concatenate([np.asarray(v, dtype=self.np_dtype) for v in lists]))
        if not self.cuda:
            return list(host.split(sizes))
        n = host.numel()
        out = torch.empty(n, dtype=self.dtype, device=self.device)
        if n > self.bufs[0].numel():
            out.copy_(host.pin_memory(), non_blocking=True)
            return list(out.split(sizes))
        i = self.next
        self.next = (i + 1) % len(self.bufs)
        event = self.events[i]
        if event is not None:
            event.synchronize()  # the copy that read this buffer last time is done (long since, normally)
        self.bufs[i][:n].copy_(host)
        out.copy_(self.bufs[i][:n], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.events[i] = event
        return list(out.split(sizes))
