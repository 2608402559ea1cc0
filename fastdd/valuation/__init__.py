"""Data valuation: influence functions (exact, CG, LiSSA, K-FAC/EK-FAC), TRAK, leave-one-out,
KNN-Shapley, TMC Data Shapley, Data Banzhaf and TracIn; the linear datamodeling score."""
from .block_cg import SolveInfo, block_cg
from .datamodels import (DatamodelTargets, LDSResult, RemovalCurve, SubsetTrainer, datamodel_targets, lds, margin_fn,
                         margins, removal_curve)
from .exact import exact_banzhaf, exact_shapley
from .influence import InfluenceFunction
from .inrun import InRunValuation
from .knn_shapley import knn_shapley
from .loo import leave_one_out
from .shapley import ValuationResult, banzhaf_msr, tmc_shapley
from .store import GradientStore
from .tracin import tracin
from .trak import TRAK
from .utility import KNNUtility, ModelUtility

__all__ = [
    "DatamodelTargets", "GradientStore", "LDSResult", "RemovalCurve", "SubsetTrainer", "TRAK", "datamodel_targets", "lds",
    "margin_fn", "margins", "removal_curve",
    "InRunValuation", "InfluenceFunction", "KNNUtility", "ModelUtility", "SolveInfo", "ValuationResult", "banzhaf_msr", "block_cg",
    "exact_banzhaf", "exact_shapley", "knn_shapley", "leave_one_out", "tmc_shapley", "tracin",
]
