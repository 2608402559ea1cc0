"""Guarded triton import shared by the kernel modules."""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError(
        "fastdd's Triton kernels need triton: pip install triton "
        "(or set FASTDD_BACKEND=torch to use the PyTorch path)"
    ) from exc

# Triton's interpreter mishandles tl.dot on bf16/fp16 operands (numpy has no bf16), so
# under TRITON_INTERPRET=1 the kernels upcast blocks to fp32 before each dot.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

__all__ = ["triton", "tl", "INTERPRET"]
