"""Offline analysis of captured gradients: load alignment results, compute statistics."""

from graddyn.analysis.alignment import (
    GROUPS,
    SERIES,
    AlignmentResults,
    Checkpoint,
    load_alignment,
)
from graddyn.analysis.statistics import (
    AlignmentStats,
    SeriesStats,
    TracInEstimate,
    WeightStats,
    bootstrap_mean_ci,
    compute_statistics,
    count_sign_changes,
    fraction_positive,
    tracin_estimate,
    weight_stats,
)

__all__ = [
    "GROUPS",
    "SERIES",
    "AlignmentResults",
    "AlignmentStats",
    "Checkpoint",
    "SeriesStats",
    "TracInEstimate",
    "WeightStats",
    "bootstrap_mean_ci",
    "compute_statistics",
    "count_sign_changes",
    "fraction_positive",
    "load_alignment",
    "tracin_estimate",
    "weight_stats",
]
