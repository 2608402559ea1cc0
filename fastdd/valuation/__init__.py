"""Data valuation: influence functions, leave-one-out, KNN-Shapley, TMC Data Shapley,
Data Banzhaf and TracIn."""
from .block_cg import SolveInfo, block_cg
from .exact import exact_banzhaf, exact_shapley
from .influence import InfluenceFunction
from .knn_shapley import knn_shapley
from .loo import leave_one_out
from .shapley import ValuationResult, banzhaf_msr, tmc_shapley
from .tracin import tracin
from .utility import KNNUtility, ModelUtility

__all__ = [
    "InfluenceFunction", "KNNUtility", "ModelUtility", "SolveInfo", "ValuationResult", "banzhaf_msr", "block_cg",
    "exact_banzhaf", "exact_shapley", "knn_shapley", "leave_one_out", "tmc_shapley", "tracin",
]
