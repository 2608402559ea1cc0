"""Dataset distillation (in progress, issue #4): gradient matching (DC/DSA), distribution
matching, differentiable siamese augmentation, the evaluation protocol and the coreset baselines."""
from .augment import DSA, AugParams
from .dc import GradientMatching, match_distance
from .dm import DistributionMatching
from .evaluate import evaluate, herding_subset, kmeans_subset, random_subset

__all__ = ["DSA", "AugParams", "DistributionMatching", "GradientMatching", "match_distance", "evaluate", "herding_subset", "kmeans_subset", "random_subset"]
