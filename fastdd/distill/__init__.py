"""Dataset distillation (in progress): differentiable siamese augmentation, the evaluation
protocol and the coreset baselines. The distillation methods themselves are issue #4."""
from .augment import DSA, AugParams
from .evaluate import evaluate, herding_subset, kmeans_subset, random_subset

__all__ = ["DSA", "AugParams", "evaluate", "herding_subset", "kmeans_subset", "random_subset"]
