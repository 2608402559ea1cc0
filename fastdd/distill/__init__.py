"""Dataset distillation (in progress, issue #4): gradient matching (DC/DSA), distribution
matching, trajectory matching (MTT) with expert trajectories, differentiable siamese
augmentation, the evaluation protocol and the coreset baselines."""
from .augment import DSA, AugParams
from .dc import GradientMatching, match_distance
from .dm import DistributionMatching
from .mtt import TrajectoryMatching, train_experts
from .evaluate import evaluate, herding_subset, kmeans_subset, random_subset

__all__ = ["DSA", "AugParams", "DistributionMatching", "GradientMatching", "TrajectoryMatching", "match_distance",
           "train_experts", "evaluate", "herding_subset", "kmeans_subset", "random_subset"]
