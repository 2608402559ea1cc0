"""Per-sample gradients: materialized, norms, dots with fixed vectors, random projections, class
means; ``check``
compares the engine with torch.func on a user's model."""
from .api import (
    PerSampleGrads,
    clipped_grad,
    classwise_grads,
    per_sample_grad_dots,
    per_sample_grad_norms,
    per_sample_grad_projections,
    per_sample_grads,
)
from .check import CheckReport, check

__all__ = [
    "CheckReport",
    "PerSampleGrads",
    "check",
    "clipped_grad",
    "classwise_grads",
    "per_sample_grad_dots",
    "per_sample_grad_norms",
    "per_sample_grad_projections",
    "per_sample_grads",
]
