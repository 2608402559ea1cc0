"""Dataset distillation (in progress, issue #4): distribution matching, differentiable
siamese augmentation, the evaluation protocol and the coreset baselines."""
from .augment import DSA, AugParams
from .dm import DistributionMatching
from .evaluate import evaluate, herding_subset, kmeans_subset, random_subset

__all__ = ["DSA", "AugParams", "DistributionMatching", "evaluate", "herding_subset", "kmeans_subset", "random_subset"]
