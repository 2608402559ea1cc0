"""Dataset distillation (issue #4, in progress): ``distill()`` over meta-learning (DD),
gradient matching (DC/DSA), distribution matching (DM) and trajectory matching (MTT) with
expert trajectories; differentiable siamese augmentation; the evaluation protocol and the
coreset baselines."""
from .api import SyntheticSet, distill
from .augment import DSA, AugParams, DCAugment
from .dd import MetaLearning
from .dc import GradientMatching, match_distance
from .dm import DistributionMatching
from .mtt import TrajectoryMatching, train_experts
from .evaluate import evaluate, paper_augmentation, herding_subset, kmeans_subset, random_subset

__all__ = ["SyntheticSet", "distill", "MetaLearning", "DSA", "AugParams", "DCAugment", "paper_augmentation", "DistributionMatching", "GradientMatching", "TrajectoryMatching", "match_distance",
           "train_experts", "evaluate", "herding_subset", "kmeans_subset", "random_subset"]
