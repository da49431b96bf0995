"""The alignment figure of a run: G(t) per component, G(t) per weight group, weights.

One PNG with three panels sharing the training-step axis, drawn in black and greys with
distinct line styles and markers so that it survives greyscale printing:

* (a) `G` of the whole loss, of positive and negative learning, and of the control with
  the weight replaced by its batch mean;
* (b) `G` of the top / middle / bottom weight groups (their sum is the whole);
* (c) the distribution of the weight (ω or |Â|) per checkpoint: boxes from quartile to
  quartile, median line, whiskers from min to max; past 40 checkpoints, where boxes
  would crowd, the same quantiles drawn as bands.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

from graddyn.analysis.alignment import GROUPS, AlignmentResults

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 200
G_LABEL = "G = ⟨g′, ∇L⟩"
SYMLOG_SPAN = 100.0
MAX_BOXES = 40
MAX_MARKERS = 16

COMPONENT_STYLES = {
    "whole": dict(label="whole loss", color="black", ls="-", marker="o", mfc="black"),
    "positive": dict(label="positive", color="0.3", ls="--", marker="^", mfc="0.3"),
    "negative": dict(label="negative", color="0.3", ls="-.", marker="v", mfc="white"),
    "control_mean_weight": dict(
        label="control (mean weight)", color="0.55", ls=":", marker="s", mfc="white"
    ),
}
GROUP_STYLES = {
    "top": dict(color="black", ls="-", marker="o", mfc="black"),
    "middle": dict(color="0.35", ls="--", marker="s", mfc="white"),
    "bottom": dict(color="0.6", ls=":", marker="^", mfc="0.6"),
}
RC = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "savefig.dpi": DPI,
}


def choose_yscale(series: Sequence[np.ndarray]) -> tuple[str, float | None]:
    """Pick a linear or symmetric-log y axis for several series drawn together.

    Rule: symlog when the values take both signs and the typical magnitudes of the series
    (median of each series' nonzero |G|) differ by a factor of at least 100, because on a
    linear axis the smaller series would then look flat at zero. The linear threshold is
    the power of ten at or below the smallest typical magnitude, so that every series
    still shows its own variation.

    Returns:
        `("linear", None)` or `("symlog", linthresh)`.
    """
    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in series])
    if not (np.any(values > 0) and np.any(values < 0)):
        return "linear", None
    magnitudes = []
    for s in series:
        nonzero = np.abs(np.asarray(s, dtype=np.float64))
        nonzero = nonzero[nonzero > 0]
        if nonzero.size:
            magnitudes.append(float(np.median(nonzero)))
    if len(magnitudes) < 2 or max(magnitudes) < SYMLOG_SPAN * min(magnitudes):
        return "linear", None
    return "symlog", 10.0 ** math.floor(math.log10(min(magnitudes)))


def _apply_yscale(ax: Axes, series: Sequence[np.ndarray]) -> None:
    scale, linthresh = choose_yscale(series)
    if scale == "symlog":
        ax.set_yscale("symlog", linthresh=linthresh, linscale=1.0)
        ax.set_ylabel(f"{G_LABEL}\n(symlog, linear within ±{linthresh:.0e})")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
        ax.set_ylabel(G_LABEL)


def _markevery(n_points: int) -> int:
    return max(1, math.ceil(n_points / MAX_MARKERS))


def _legend_below(ax: Axes, **kwargs: object) -> None:
    """A legend under the panel, where it never hides data, the same in every panel."""
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, **kwargs)


def _plot_components(ax: Axes, results: AlignmentResults, steps: np.ndarray) -> None:
    drawn = []
    width = 1.2 if steps.size <= MAX_BOXES else 0.8
    for name, style in COMPONENT_STYLES.items():
        values = results.series(name)
        drawn.append(values)
        label = style["label"].replace("weight", results.weight_symbol)
        ax.plot(
            steps, values, lw=width, markevery=_markevery(steps.size), **{**style, "label": label}
        )
    ax.axhline(0.0, color="0.5", lw=0.6, zorder=0)
    _apply_yscale(ax, drawn)
    ax.set_title("(a) components")
    ax.set_xlabel("training step")
    _legend_below(ax)


def _plot_groups(ax: Axes, results: AlignmentResults, steps: np.ndarray) -> None:
    drawn = []
    for group in GROUPS:
        values = results.series(f"{group}.whole")
        drawn.append(values)
        label = f"{group} {results.weight_symbol}"
        ax.plot(
            steps,
            values,
            label=label,
            lw=1.2 if steps.size <= MAX_BOXES else 0.8,
            markevery=_markevery(steps.size),
            **GROUP_STYLES[group],
        )
    ax.axhline(0.0, color="0.5", lw=0.6, zorder=0)
    _apply_yscale(ax, drawn)
    ax.set_title(f"(b) {results.weight_symbol} groups (sum = whole)")
    ax.set_xlabel("training step")
    _legend_below(ax)


def _box_width(steps: np.ndarray) -> float:
    if steps.size > 1:
        return 0.6 * float(np.min(np.diff(steps)))
    return max(0.6, 0.1 * float(steps[0]))


def _plot_weights(ax: Axes, results: AlignmentResults, steps: np.ndarray) -> None:
    symbol = results.weight_symbol
    batches = [c.all_weights() for c in results.checkpoints]
    keep = [i for i, batch in enumerate(batches) if batch.size]
    ax.set_title(f"(c) {symbol} per checkpoint")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{symbol} per {results.item_kind}")
    if not keep:
        ax.text(
            0.5,
            0.5,
            "no weights recorded",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )
        return
    positions = steps[keep]
    data = [batches[i] for i in keep]
    if len(data) <= MAX_BOXES:
        ax.boxplot(
            data,
            positions=positions,
            widths=_box_width(positions),
            whis=(0, 100),
            showfliers=False,
            manage_ticks=False,
            patch_artist=True,
            boxprops=dict(facecolor="0.85", edgecolor="black", linewidth=0.6),
            medianprops=dict(color="black", linewidth=1.0),
            whiskerprops=dict(color="black", linewidth=0.6),
            capprops=dict(color="black", linewidth=0.6),
        )
        _legend_below(
            ax,
            handles=[
                Patch(facecolor="0.85", edgecolor="black", linewidth=0.6, label="quartiles"),
                Line2D([], [], color="black", lw=1.0, label="median"),
                Line2D([], [], color="black", lw=0.6, marker="_", ms=8, label="min–max"),
            ],
        )
        return
    quantiles = np.array([np.quantile(batch, [0, 0.25, 0.5, 0.75, 1]) for batch in data])
    ax.fill_between(positions, quantiles[:, 0], quantiles[:, 4], color="0.88", lw=0)
    ax.fill_between(positions, quantiles[:, 1], quantiles[:, 3], color="0.65", lw=0)
    ax.plot(positions, quantiles[:, 2], color="black", lw=1.0)
    _legend_below(
        ax,
        handles=[
            Patch(facecolor="0.65", label="quartiles"),
            Line2D([], [], color="black", lw=1.0, label="median"),
            Patch(facecolor="0.88", edgecolor="0.6", linewidth=0.4, label="min–max"),
        ],
    )


def _set_step_axis(ax: Axes, steps: np.ndarray) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    if steps.size == 1:
        half = max(1.0, 0.5 * float(steps[0]))
        ax.set_xlim(float(steps[0]) - half, float(steps[0]) + half)


def plot_alignment(results: AlignmentResults, path: str | Path) -> Path:
    """Draw the alignment figure of a run and save it as a PNG (dpi 200).

    Args:
        results: loaded alignment results (one checkpoint is enough).
        path: where to write the PNG; its folder is created if needed.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = results.steps
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, 3, figsize=(11.0, 3.8), sharex=True, layout="constrained")
        _plot_components(axes[0], results, steps)
        _plot_groups(axes[1], results, steps)
        _plot_weights(axes[2], results, steps)
        _set_step_axis(axes[0], steps)
        target = results.target
        fig.suptitle(
            f"{results.loss.upper()}: gradient alignment with the "
            f"{target.kind.replace('_', ' ')} ({target.n_targets} targets)",
            fontsize=10,
        )
        fig.savefig(path, dpi=DPI, format="png")
        plt.close(fig)
    logger.info("wrote %s", path)
    return path
