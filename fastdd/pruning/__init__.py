"""Data pruning: difficulty scores (and a training-dynamics logger), k-means prototypes, set selection
(score-based, coverage-centric, Moderate, coresets), pruning curves and the teacher-student theory."""
from .curve import PruningCurve, default_train_fn, pruning_curve
from .kmeans import KMeansResult, kmeans, prototype_scores
from .scores import ForgettingTracker, TrainingDynamics, el2n_scores, grand_scores
from .boundary import KeepBoundary, pilot_boundary
from .selection import ccs_hard_cutoff, herding, kcenter_greedy, recommend_keep, select
from .ssl import self_supervised_embeddings

__all__ = [
    "ForgettingTracker", "KMeansResult", "PruningCurve", "default_train_fn", "el2n_scores", "grand_scores",
    "herding", "kcenter_greedy", "kmeans", "prototype_scores", "pruning_curve", "recommend_keep", "select",
    "self_supervised_embeddings", "TrainingDynamics", "ccs_hard_cutoff", "KeepBoundary", "pilot_boundary",
]
