"""Chunk sizes that bound the memory of temporaries.

Consumers that would need ``B x numel`` temporaries (materialized per-sample gradients
inside a norm or a dot, Gram matrices, vmap fallbacks) work on chunks of samples whose
temporaries fit in ``FASTDD_CHUNK_MB`` megabytes (default 256).
"""
from __future__ import annotations

import os


def budget_bytes() -> int:
    """The temporary-memory budget of one chunk, in bytes."""
    raw = os.environ.get("FASTDD_CHUNK_MB", "256")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"FASTDD_CHUNK_MB={raw!r} is not a number of megabytes") from None
    if mb <= 0:
        raise ValueError(f"FASTDD_CHUNK_MB must be positive, got {raw!r}")
    return int(mb * (1 << 20))


def rows_per_chunk(n: int, bytes_per_row: int, chunk_size: int | None = None) -> int:
    """How many of ``n`` rows to process at once: ``chunk_size`` if given, else what fits."""
    if chunk_size is not None:
        return max(1, min(n, int(chunk_size)))
    return max(1, min(n, budget_bytes() // max(1, bytes_per_row)))


def chunks(n: int, size: int):
    """Slices covering range(n) in steps of ``size``."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
