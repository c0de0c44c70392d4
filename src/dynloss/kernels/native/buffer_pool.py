"""Input-sized float32 (float64) buffers for the native kernels, reused from step to step.

Each native forward pass that needs a gradient writes one input-sized buffer (the saved
slopes), which the backward pass then turns into the gradient. A fresh ``torch.empty`` of that
size costs more than the kernel itself whenever the C allocator has handed the memory back to
the operating system in between, as glibc does once a training step has freed large tensors:
the first write to every 4 KiB page is then a page fault (2048 of them for 8 MiB; measured
here at ~1.6 us each, ~3 ms, against a ~1.6 ms forward pass).

The pool keeps the buffers it handed out and hands one out again once nothing else refers to
its storage any more (the gradient it became was consumed and dropped), so in a training
loop the same resident memory serves every step. A buffer still in use (the caller kept the
gradient) is never handed out, nor is one whose storage was resized in place (``resize_(0)``,
as FSDP/ZeRO-style code frees a gradient): it is dropped. A forked child starts with an empty
pool and a new lock. At most :data:`MAX_BUFFERS` buffers and :data:`MAX_BYTES`
bytes are kept; the least recently used beyond that are released to the allocator. Set
``DYNLOSS_NATIVE_POOL=0`` (before importing dynloss) to allocate afresh every time.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref

import torch
from torch import Tensor

from ._env import switched_on

__all__ = ["ENABLED", "MAX_BUFFERS", "MAX_BYTES", "BufferPool", "pool_enabled"]

MAX_BUFFERS = 4
MAX_BYTES = 512 * 2**20
MIN_BYTES = 2**20
"""Smaller buffers are allocated afresh: the allocator serves them from memory it keeps (no
page faults), and taking one from the pool costs more than allocating it."""

_use_count = getattr(torch._C, "_storage_Use_Count", None)


ENABLED = _use_count is not None and switched_on("DYNLOSS_NATIVE_POOL",
                                                 "the buffer pool stays on")
"""Whether buffers are reused: ``DYNLOSS_NATIVE_POOL`` was not off (``0``, ``off``, ...) when
dynloss was imported (read once: an environment look-up costs more than the rest of a pooled
allocation), and this torch can tell when a storage is free."""


def pool_enabled() -> bool:
    """Whether buffers are reused (:data:`ENABLED`)."""
    return ENABLED


def _references(storage: torch.UntypedStorage) -> int:
    assert _use_count is not None
    return int(_use_count(storage._cdata))


_POOLS: weakref.WeakSet[BufferPool] = weakref.WeakSet()
"""Every pool, renewed in a forked child (:func:`_after_fork_in_child`)."""


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


CPU = torch.device("cpu")
"""Where every tensor of the native kernels lives, whatever torch's default device."""


class BufferPool:
    """CPU buffers by dtype and element count, each handed out again once it is free."""

    def __init__(self, max_buffers: int = MAX_BUFFERS, max_bytes: int = MAX_BYTES,
                 min_bytes: int = 0) -> None:
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        # [buffer, its storage, the storage's reference count and its Python object's when the
        # buffer is free, its data pointer, the buffer's Python object's count when free]: the
        # storage object is kept so that a look-up creates no Python object, and it is the one
        # ``x.grad.untyped_storage()`` returns, so a caller that keeps only it holds no count
        # on the storage, only on the object; the same for the flat buffer, a gradient's
        # ``_base``
        self._entries: list[list] = []
        self._lock = threading.Lock()
        _POOLS.add(self)  # (a lock another thread held at a fork stays held in the child)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._entries = []

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32
              ) -> Tensor:
        """An uninitialised ``dtype`` CPU tensor of ``shape`` (a free pooled one of that dtype
        if any).

        On the CPU whatever torch's default device (``torch.set_default_device``). Under
        ``torch.inference_mode`` a fresh one, not pooled: an inference tensor cannot be saved
        for a later training call's backward, to which the pool would hand it."""
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * dtype.itemsize
        if (not ENABLED or nbytes > self.max_bytes or nbytes < self.min_bytes
                or torch.is_inference_mode_enabled()):
            return torch.empty(shape, dtype=dtype, device=CPU)
        with self._lock:
            entries = self._entries
            for index, entry in enumerate(entries):
                buffer, storage, free, free_objects, address, free_buffers = entry
                if (buffer.numel() == numel and buffer.dtype == dtype
                        and _references(storage) == free
                        and sys.getrefcount(storage) == free_objects
                        and sys.getrefcount(buffer) == free_buffers):
                    if storage.data_ptr() != address or storage.nbytes() != nbytes:
                        entries.pop(index)  # resized in place (freed, as FSDP does): its
                        break               # memory is gone or another
                    if storage.is_shared():  # sent to another process, whose hold is not
                        entries.pop(index)   # counted here: never handed out again
                        break
                    if index != len(entries) - 1:  # most recently used last
                        entries.append(entries.pop(index))
                    return buffer.view(shape)
            buffer = torch.empty(numel, dtype=dtype, device=CPU)
            storage = buffer.untyped_storage()
            entry = [buffer, storage, _references(storage), 0, storage.data_ptr(), 0]
            entry[3] = sys.getrefcount(storage)  # (the same references as in the loop above)
            entry[5] = sys.getrefcount(buffer)
            entries.append(entry)
            while (len(entries) > self.max_buffers
                   or sum(e[0].nbytes for e in entries) > self.max_bytes):
                entries.pop(0)
            return buffer.view(shape)

    def clear(self) -> None:
        """Forget every buffer (those in use stay valid; the rest go back to the allocator)."""
        with self._lock:
            self._entries.clear()

    def nbytes(self) -> int:
        """The bytes of the buffers the pool keeps (in use or free): resident memory that stays
        allocated between calls."""
        with self._lock:
            return sum(entry[0].nbytes for entry in self._entries)

    def __len__(self) -> int:
        return len(self._entries)


POOL = BufferPool(min_bytes=MIN_BYTES)
"""The pool of the native kernels' saved buffers."""
