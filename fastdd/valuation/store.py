"""A store of projected per-sample gradients on disk: written once in chunks, read many times.

The rows live in a memory-mapped ``.npy`` (``numpy.load(path, mmap_mode="r")`` reads it
anywhere); beside it ``<path>.meta`` records the run's identity (the model's weights, the
projection's kind, dim and seed, the output function, a fingerprint of the data) and how many
rows are done, saved after every chunk. A rerun with the same identity resumes where the last
one stopped; a store of another model, projection or data set is refused, never mixed.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .. import _checkpoint


class GradientStore:
    """Rows ``[n, dim]`` (float32) at ``path`` (``.npy``), filled in order and resumable.

    >>> store = GradientStore("grads.npy", n=60000, dim=4096, identity={...})
    >>> for s in store.missing(chunk=1024): store.write(s, rows_for(s))
    >>> store.rows()   # a read-only memory map [n, dim]
    """

    def __init__(self, path: str, n: int, dim: int, identity: dict):
        path = os.fspath(path)
        if not path.endswith(".npy"):
            raise ValueError(f"a gradient store is a .npy file, got {path!r}")
        if os.path.isdir(path):
            raise ValueError(f"gradient store {path} is a directory, not a file")
        self.path, self.meta = path, path + ".meta"
        self.n, self.dim = int(n), int(dim)
        self.identity = dict(identity, shape=[self.n, self.dim])
        self.done = 0
        state = _checkpoint.load(self.meta, self.identity) if os.path.exists(self.path) else None
        if state is not None:
            mm = np.load(self.path, mmap_mode="r")
            if mm.shape != (self.n, self.dim) or mm.dtype != np.float32:
                raise _checkpoint.CheckpointError(
                    f"gradient store {path} holds {mm.dtype} {mm.shape}, expected float32 {(self.n, self.dim)}")
            self.done = int(state["done"])
            self._mm = np.load(self.path, mmap_mode="r+")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._mm = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(self.n, self.dim))
            self._save_meta()

    def _save_meta(self):
        _checkpoint.save(self.meta, {"identity": _checkpoint.fingerprint(self.identity), "done": self.done})

    @property
    def complete(self) -> bool:
        return self.done >= self.n

    def missing(self, chunk: int):
        """Slices of rows still to write, in order, ``chunk`` rows each."""
        for start in range(self.done, self.n, chunk):
            yield slice(start, min(self.n, start + chunk))

    def write(self, s: slice, rows: torch.Tensor) -> None:
        """Write rows ``s`` (the next ones) and record them as done."""
        if s.start != self.done:
            raise ValueError(f"rows must be written in order: next is {self.done}, got {s.start}")
        self._mm[s] = rows.detach().to("cpu", torch.float32).numpy()
        self._mm.flush()
        self.done = s.stop
        self._save_meta()

    def rows(self) -> np.ndarray:
        """The stored rows as a read-only memory map ``[n, dim]`` (complete stores only)."""
        if not self.complete:
            raise RuntimeError(f"gradient store {self.path} holds {self.done} of {self.n} rows")
        return np.load(self.path, mmap_mode="r")
