"""Data valuation: influence functions, leave-one-out, KNN-Shapley, TMC Data Shapley,
Data Banzhaf and TracIn."""
from .block_cg import SolveInfo, block_cg
from .exact import exact_banzhaf, exact_shapley
from .influence import InfluenceFunction
from .knn_shapley import knn_shapley

__all__ = ["InfluenceFunction", "SolveInfo", "block_cg", "exact_banzhaf", "exact_shapley", "knn_shapley"]
