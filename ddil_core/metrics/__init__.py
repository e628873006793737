"""Evaluation metrics (FID formula, PRDC, diversity) and the report layer; no dependence on the rest of ddil."""
from .diversity import mean_pairwise_distance
from .fid import frechet_distance, torchmetrics_fid
from .prdc import precision_recall_density_coverage

__all__ = ["frechet_distance", "torchmetrics_fid", "precision_recall_density_coverage", "mean_pairwise_distance"]
