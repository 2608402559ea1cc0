"""fastdd: data valuation, pruning and dataset distillation over fast per-sample gradients.

The gradient engine is re-exported here; heavier pieces (Triton, the CUDA extension,
scikit-learn, matplotlib) load on first use, so ``import fastdd`` stays cheap.
"""
from .grad import (
    PerSampleGrads,
    classwise_grads,
    per_sample_grad_dots,
    per_sample_grad_norms,
    per_sample_grad_projections,
    per_sample_grads,
)

__version__ = "0.1.0"

__all__ = [
    "PerSampleGrads",
    "classwise_grads",
    "per_sample_grad_dots",
    "per_sample_grad_norms",
    "per_sample_grad_projections",
    "per_sample_grads",
]
