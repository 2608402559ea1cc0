"""Output buffers for materialized per-sample gradients, handed out again once the caller
has dropped every reference to them.

A plain ``per_sample_grads(model, x, y)`` in a loop writes ``B x P`` values per call into
freshly allocated memory; on a CPU the page faults of that memory, not the arithmetic,
are most of the time (548 MB per call for the MLP 784-512-256-10 at B=256). The pool
keeps the memory of earlier results and reuses it when nothing outside the pool refers
to it any more: no tensor, view, numpy array or DLPack capsule of it is alive (the
storage's reference count says so). Memory a caller still holds is never handed out.

Each call gets tensors of its own that alias a pooled storage (not views of a pooled
tensor), so a caller's results look like any other tensor. At most ``SETS`` buffers per
(shape, dtype, device) and ``KEYS`` shapes are kept, so a loop whose previous result is
still alive during the next call (``g = per_sample_grads(...)``) alternates between two
sets. ``release()`` frees what the pool keeps; ``FASTDD_REUSE_BUFFERS=0`` turns it off.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch

SETS = 2  # buffers kept per (shape, dtype, device): the result in hand and the one being written
KEYS = 8  # (shape, dtype, device) keys kept, least recently used dropped first

_pool: "OrderedDict[tuple, list[torch.Tensor]]" = OrderedDict()
_unwritten: set = set()  # data pointers of CPU bases allocated and not yet written (see first_write)


def enabled() -> bool:
    raw = os.environ.get("FASTDD_REUSE_BUFFERS", "1")
    if raw not in ("0", "1"):
        raise ValueError(f"FASTDD_REUSE_BUFFERS must be 0 or 1, got {raw!r}")
    return raw == "1" and hasattr(torch._C, "_storage_Use_Count")


def _holders(t: torch.Tensor) -> int:
    """References to ``t``'s storage, less the one ``untyped_storage()`` itself creates."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1


def _alias(base: torch.Tensor) -> torch.Tensor:
    """A new tensor over ``base``'s storage (shares memory, is not a view of ``base``)."""
    return torch.empty(0, dtype=base.dtype, device=base.device).set_(
        base.untyped_storage(), 0, base.shape, base.stride())


def take(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized ``shape`` tensor: pooled memory nobody holds, else a new allocation
    that the pool keeps for later calls."""
    if not enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    key = (tuple(shape), dtype, torch.device(device))
    bases = _pool.setdefault(key, [])
    _pool.move_to_end(key)
    for base in bases:
        if _holders(base) == 1:  # only the pool's own tensor: every result made from it is gone
            return _alias(base)
    base = torch.empty(shape, dtype=dtype, device=device)
    if base.device.type == "cpu":
        _unwritten.add(base.data_ptr())
    bases.append(base)
    if len(bases) > SETS:  # all held by callers: stop tracking the oldest (the caller keeps it alive)
        _unwritten.discard(bases.pop(0).data_ptr())
    while len(_pool) > KEYS:
        for b in _pool.popitem(last=False)[1]:
            _unwritten.discard(b.data_ptr())
    return _alias(base)


def first_write(t: torch.Tensor) -> bool:
    """Whether ``t`` may be memory about to be written for the first time (its pages not yet faulted
    in): pooled CPU memory not yet written (True once per buffer), or any memory while the pool is
    off (nothing tracks it then, and every buffer ``take`` returns is new). Streaming stores into
    such pages cost more than ordinary ones (the kernel's zeroing of each new page leaves it in cache)."""
    if not enabled():
        return True
    ptr = t.data_ptr()
    if ptr in _unwritten:
        _unwritten.discard(ptr)
        return True
    return False


def release() -> None:
    """Free the memory the pool keeps (results still held by callers stay valid), and the
    projection matrices cached for ``per_sample_grad_projections``."""
    _pool.clear()
    _unwritten.clear()
    from .api import release_projections

    release_projections()


def pooled_bytes() -> int:
    """Bytes the pool keeps (including buffers callers still hold)."""
    return sum(b.untyped_storage().nbytes() for bases in _pool.values() for b in bases)
