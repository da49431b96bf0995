"""Rich tables of the alignment results: one row per series, or one row per checkpoint.

The functions return rich renderables and print nothing; the command line prints them.
Numbers are shown in scientific notation with three significant digits.
"""

from __future__ import annotations

from rich import box
from rich.markup import escape
from rich.table import Table

from graddyn.analysis.alignment import GROUPS, SERIES, AlignmentResults
from graddyn.analysis.statistics import AlignmentStats, SeriesStats

MISSING = "–"


def sci(value: float | None) -> str:
    """A number with three significant digits, compact (`–` for None)."""
    if value is None:
        return MISSING
    return f"{value:.3g}"


def series_label(name: str, weight_symbol: str = "ω") -> str:
    """Readable label of a series name, e.g. `top.positive` -> `top ω: positive`."""
    if name == "control_mean_weight":
        return f"control (mean {weight_symbol})"
    if "." in name:
        group, part = name.split(".")
        return f"  {group} {weight_symbol}: {part}"
    return name


def _ci(stats: SeriesStats) -> str:
    if stats.mean_ci is None:
        return "n<3"
    low, high = stats.mean_ci
    return f"[{sci(low)}, {sci(high)}]"


def alignment_table(results: AlignmentResults, stats: AlignmentStats) -> Table:
    """Summary of G(t) per component and group: sign, fluctuation, mean, first and last.

    The last column is each series' share of the SGD (TracIn) estimate of the targets'
    NLL decrease; the shares of positive and negative add up to the whole's.
    """
    level = round(100 * stats.confidence_level)
    n = stats.checks.n_checkpoints
    table = Table(
        box=box.SIMPLE_HEAD,
        title=(
            f"G(t) of {escape(results.loss.upper())} vs "
            f"{escape(results.target.kind.replace('_', ' '))} "
            f"({n} checkpoint{'s' if n != 1 else ''})"
        ),
        caption=(
            f"bootstrap {level}% CI over checkpoints (seed {stats.bootstrap_seed}); "
            "SGD ΔNLL = Σ lr·steps·G, a TracIn estimate of the targets' NLL decrease"
        ),
    )
    table.add_column("series", no_wrap=True)
    table.add_column("G>0", justify="right", no_wrap=True)
    table.add_column("sign ch.", justify="right", no_wrap=True)
    table.add_column("mean", justify="right", no_wrap=True)
    table.add_column(f"{level}% CI", justify="right", no_wrap=True)
    table.add_column("first", justify="right", no_wrap=True)
    table.add_column("last", justify="right", no_wrap=True)
    table.add_column("SGD ΔNLL", justify="right", no_wrap=True)
    for name in SERIES:
        row = stats.series[name]
        positive = round(row.fraction_positive * row.n_checkpoints)
        table.add_row(
            series_label(name, results.weight_symbol),
            f"{positive}/{row.n_checkpoints}",
            str(row.sign_changes),
            sci(row.mean),
            _ci(row),
            sci(row.first),
            sci(row.last),
            sci(row.tracin),
            end_section=name in ("control_mean_weight", "top.negative", "middle.negative"),
        )
    return table


def checkpoint_table(results: AlignmentResults) -> Table:
    """G per checkpoint (rows) for the components, the control and the groups' wholes.

    The check column says whether the per-item parts added back up to the autograd whole
    within the replay's tolerance.
    """
    symbol = results.weight_symbol
    table = Table(title=f"G per checkpoint ({escape(results.loss.upper())})")
    table.add_column("step", justify="right")
    table.add_column("lr", justify="right")
    for header in ("whole", "positive", "negative", f"control (mean {symbol})"):
        table.add_column(header, justify="right")
    for group in GROUPS:
        table.add_column(f"{group} {symbol}", justify="right")
    table.add_column("cosine", justify="right")
    table.add_column("update align.", justify="right")
    table.add_column("check")
    for c in results.checkpoints:
        a = c.alignment
        table.add_row(
            str(c.step),
            sci(c.learning_rate),
            sci(a.whole),
            sci(a.positive),
            sci(a.negative),
            sci(a.control_mean_weight),
            *(sci(a.groups[group].whole) for group in GROUPS),
            sci(c.extras.cosine),
            sci(c.extras.update_alignment),
            "ok" if c.check.passed else f"[red]FAIL {sci(c.check.parts_error)}[/red]",
        )
    return table
