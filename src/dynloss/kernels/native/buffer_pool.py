"""Input-sized float32 buffers for the native kernels, reused from step to step.

Each native forward pass that needs a gradient writes one input-sized buffer (the saved
slopes), which the backward pass then turns into the gradient. A fresh ``torch.empty`` of that
size costs more than the kernel itself whenever the C allocator has handed the memory back to
the operating system in between, as glibc does once a training step has freed large tensors:
the first write to every 4 KiB page is then a page fault (2048 of them for 8 MiB; measured
here at ~1.6 us each, ~3 ms, against a ~1.6 ms forward pass).

The pool keeps the buffers it handed out and hands one out again once nothing else refers to
its storage any more (the gradient it became was consumed and dropped), so in a training
loop the same resident memory serves every step. A buffer still in use (the caller kept the
gradient) is never handed out. At most :data:`MAX_BUFFERS` buffers and :data:`MAX_BYTES`
bytes are kept; the least recently used beyond that are released to the allocator. Set
``DYNLOSS_NATIVE_POOL=0`` to allocate afresh every time.
"""

from __future__ import annotations

import os
import threading

import torch
from torch import Tensor

__all__ = ["MAX_BUFFERS", "MAX_BYTES", "BufferPool", "pool_enabled"]

MAX_BUFFERS = 4
MAX_BYTES = 512 * 2**20

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def pool_enabled() -> bool:
    """Whether buffers are reused (``DYNLOSS_NATIVE_POOL`` is not ``0``, and this torch can
    tell when a storage is free)."""
    flag = os.environ.get("DYNLOSS_NATIVE_POOL", "1").strip().lower()
    return _use_count is not None and flag not in ("0", "false", "off", "no")


def _references(buffer: Tensor) -> int:
    assert _use_count is not None
    return int(_use_count(buffer.untyped_storage()._cdata))


class BufferPool:
    """Float32 CPU buffers by element count, each handed out again once it is free."""

    def __init__(self, max_buffers: int = MAX_BUFFERS, max_bytes: int = MAX_BYTES) -> None:
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        self._entries: list[tuple[Tensor, int]] = []  # (buffer, its reference count when free)
        self._lock = threading.Lock()

    def empty(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """An uninitialised float32 CPU tensor of ``shape`` (a free pooled one if any)."""
        numel = 1
        for size in shape:
            numel *= size
        if not pool_enabled() or numel * 4 > self.max_bytes:
            return torch.empty(shape)
        with self._lock:
            for index, (buffer, free) in enumerate(self._entries):
                if buffer.numel() == numel and _references(buffer) == free:
                    self._entries.append(self._entries.pop(index))  # most recently used last
                    return buffer.view(shape)
            buffer = torch.empty(numel)
            self._entries.append((buffer, _references(buffer)))
            while (len(self._entries) > self.max_buffers
                   or sum(b.numel() * 4 for b, _ in self._entries) > self.max_bytes):
                self._entries.pop(0)
            return buffer.view(shape)

    def clear(self) -> None:
        """Forget every buffer (those in use stay valid; the rest go back to the allocator)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


POOL = BufferPool()
"""The pool of the native kernels' saved buffers."""
