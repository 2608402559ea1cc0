"""Per-sample gradients: materialized, norms, dots with fixed vectors, class means."""
from .api import (
    PerSampleGrads,
    classwise_grads,
    per_sample_grad_dots,
    per_sample_grad_norms,
    per_sample_grads,
)

__all__ = [
    "PerSampleGrads",
    "classwise_grads",
    "per_sample_grad_dots",
    "per_sample_grad_norms",
    "per_sample_grads",
]
