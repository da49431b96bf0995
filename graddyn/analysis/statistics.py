"""Statistics of G over checkpoints: sign, fluctuation, bootstrap CI of the mean, the
TracIn-style SGD estimate of the targets' NLL decrease, and the weight distributions."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from graddyn.analysis.alignment import (
    GROUPS,
    SERIES,
    TRACIN_LABEL,
    UPDATE_ESTIMATE_LABEL,
    AlignmentResults,
    Checkpoint,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesStats:
    """How one series of `G` values behaves over the checkpoints."""

    name: str
    n_checkpoints: int
    mean: float
    mean_ci: tuple[float, float] | None
    fraction_positive: float
    sign_changes: int
    first: float
    last: float
    tracin: float


@dataclass(frozen=True)
class TracInEstimate:
    """TracIn-style SGD estimate of how much training decreased the targets' NLL.

    `contributions[k]` is `learning_rate_k * steps_since_previous_k * G_k` of the whole
    loss; `total` is their sum. `update_total` uses the update alignment instead of `G`
    and is None when a checkpoint did not record it.
    """

    label: str
    contributions: tuple[float, ...]
    total: float
    update_label: str
    update_total: float | None


@dataclass(frozen=True)
class WeightStats:
    """Distribution of item weights (ω or |Â|) in one batch or group.

    `std` is the population standard deviation (ddof = 0): it describes this batch, it
    does not estimate a wider population.
    """

    count: int
    mean: float
    std: float
    min: float
    q25: float
    median: float
    q75: float
    max: float


@dataclass(frozen=True)
class CheckpointWeightStats:
    """Weight distribution at one checkpoint, over the batch and per group (None if empty)."""

    step: int
    all: WeightStats | None
    groups: dict[str, WeightStats | None]


@dataclass(frozen=True)
class ChecksSummary:
    """Whether the per-item parts added back up to the autograd whole at every checkpoint."""

    n_checkpoints: int
    n_failed: int
    failed_steps: tuple[int, ...]
    max_parts_error: float


@dataclass(frozen=True)
class AlignmentStats:
    """All statistics of a run's alignment results, as the report shows them."""

    series: dict[str, SeriesStats]
    tracin: TracInEstimate
    weights: tuple[CheckpointWeightStats, ...]
    checks: ChecksSummary
    confidence_level: float
    bootstrap_seed: int


def fraction_positive(values: np.ndarray) -> float:
    """Fraction of the values that are strictly positive (zeros count as not positive)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("fraction_positive of an empty series")
    return float(np.count_nonzero(values > 0) / values.size)


def count_sign_changes(values: np.ndarray) -> int:
    """Number of consecutive nonzero values of opposite sign, zeros skipped.

    `[1, -1, 0, 2, 3]` has two sign changes (1 to -1, then -1 to 2): a fluctuating `G`
    changes sign often, a supervised-like `G` keeps its sign.
    """
    signs = np.sign(np.asarray(values, dtype=np.float64))
    signs = signs[signs != 0]
    return int(np.count_nonzero(signs[1:] != signs[:-1]))


def bootstrap_mean_ci(
    values: np.ndarray, confidence: float = 0.95, seed: int = 0, n_resamples: int = 9999
) -> tuple[float, float] | None:
    """Bootstrap confidence interval of the mean of a series, resampling checkpoints.

    Uses scipy's BCa interval (percentile interval where BCa is undefined). Checkpoints
    are treated as exchangeable, which ignores their correlation in time: read the
    interval as a description of spread, not as a test.

    Returns:
        `(low, high)`, or None with fewer than 3 values, where a bootstrap says nothing.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size < 3:
        return None
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    interval = None
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = scipy_stats.bootstrap(
                (values,),
                np.mean,
                n_resamples=n_resamples,
                confidence_level=confidence,
                method=method,
                vectorized=True,
                rng=np.random.default_rng(seed),
            )
        interval = result.confidence_interval
        if np.isfinite(interval.low) and np.isfinite(interval.high):
            break
    assert interval is not None
    return float(interval.low), float(interval.high)


def tracin_contributions(results: AlignmentResults, values: np.ndarray) -> np.ndarray:
    """Per-checkpoint `learning_rate * steps_since_previous * value` (TracInCP terms)."""
    scale = np.array(
        [c.learning_rate * c.steps_since_previous for c in results.checkpoints],
        dtype=np.float64,
    )
    return scale * np.asarray(values, dtype=np.float64)


def tracin_estimate(results: AlignmentResults) -> TracInEstimate:
    """SGD estimate of the decrease of the targets' NLL, `Σ_k η_k n_k G_k` (whole loss).

    Positive means training is estimated to have made the targets more likely. With
    Adam-type optimizers the applied step differs from the gradient, hence the second
    sum over the update alignment when every checkpoint recorded it.
    """
    contributions = tracin_contributions(results, results.series("whole"))
    updates = [c.extras.update_alignment for c in results.checkpoints]
    update_total = None
    if all(value is not None for value in updates):
        update_total = float(tracin_contributions(results, np.array(updates)).sum())
    return TracInEstimate(
        label=TRACIN_LABEL,
        contributions=tuple(float(value) for value in contributions),
        total=float(contributions.sum()),
        update_label=UPDATE_ESTIMATE_LABEL,
        update_total=update_total,
    )


def series_stats(
    results: AlignmentResults, name: str, confidence: float = 0.95, seed: int = 0
) -> SeriesStats:
    """Statistics of one series over the checkpoints (see `SeriesStats`)."""
    values = results.series(name)
    return SeriesStats(
        name=name,
        n_checkpoints=int(values.size),
        mean=float(values.mean()),
        mean_ci=bootstrap_mean_ci(values, confidence=confidence, seed=seed),
        fraction_positive=fraction_positive(values),
        sign_changes=count_sign_changes(values),
        first=float(values[0]),
        last=float(values[-1]),
        tracin=float(tracin_contributions(results, values).sum()),
    )


def weight_stats(values: np.ndarray) -> WeightStats | None:
    """Distribution statistics of a set of item weights; None when it is empty."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None
    low, q25, median, q75, high = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return WeightStats(
        count=int(values.size),
        mean=float(values.mean()),
        std=float(values.std(ddof=0)),
        min=float(low),
        q25=float(q25),
        median=float(median),
        q75=float(q75),
        max=float(high),
    )


def checkpoint_weight_stats(checkpoint: Checkpoint) -> CheckpointWeightStats:
    """Weight distribution of one checkpoint's batch, global and per group."""
    return CheckpointWeightStats(
        step=checkpoint.step,
        all=weight_stats(checkpoint.all_weights()),
        groups={group: weight_stats(checkpoint.weights[group]) for group in GROUPS},
    )


def summarize_checks(results: AlignmentResults) -> ChecksSummary:
    """Collect the parts-versus-whole checks; a failure is logged as a warning."""
    failed = tuple(c.step for c in results.checkpoints if not c.check.passed)
    if failed:
        logger.warning(
            "%s: the parts did not add up to the whole within tolerance at steps %s",
            results.path,
            ", ".join(str(step) for step in failed),
        )
    return ChecksSummary(
        n_checkpoints=len(results.checkpoints),
        n_failed=len(failed),
        failed_steps=failed,
        max_parts_error=max(c.check.parts_error for c in results.checkpoints),
    )


def compute_statistics(
    results: AlignmentResults, confidence: float = 0.95, seed: int = 0
) -> AlignmentStats:
    """Every statistic the report shows, from the loaded results.

    Args:
        results: the loaded alignment results.
        confidence: level of the bootstrap intervals of the series means.
        seed: seed of the bootstrap, fixed so that a report is reproducible.
    """
    return AlignmentStats(
        series={
            name: series_stats(results, name, confidence=confidence, seed=seed) for name in SERIES
        },
        tracin=tracin_estimate(results),
        weights=tuple(checkpoint_weight_stats(c) for c in results.checkpoints),
        checks=summarize_checks(results),
        confidence_level=confidence,
        bootstrap_seed=seed,
    )
