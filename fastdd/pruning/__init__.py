"""Data pruning: difficulty scores, k-means prototypes, set selection and pruning curves."""
from .curve import PruningCurve, default_train_fn, pruning_curve
from .kmeans import KMeansResult, kmeans, prototype_scores
from .scores import ForgettingTracker, el2n_scores, grand_scores
from .selection import herding, kcenter_greedy, recommend_keep, select
from .ssl import self_supervised_embeddings

__all__ = [
    "ForgettingTracker", "KMeansResult", "PruningCurve", "default_train_fn", "el2n_scores", "grand_scores",
    "herding", "kcenter_greedy", "kmeans", "prototype_scores", "pruning_curve", "recommend_keep", "select",
    "self_supervised_embeddings",
]
