"""The report of `graddyn analyze RUN_DIR`: JSON summary, figure and tables of a run.

`analyze_run` is the whole offline analysis in one call: load
`RUN_DIR/alignment/alignment.json`, compute the statistics, write `summary.json` and
`alignment.png` into the report folder, and hand back the paths and the rich tables for
the command line to print.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from graddyn.analysis.alignment import AlignmentResults, load_alignment
from graddyn.analysis.statistics import AlignmentStats, compute_statistics
from graddyn.report.figures import plot_alignment
from graddyn.report.tables import alignment_table, checkpoint_table, sci

logger = logging.getLogger(__name__)

SUMMARY_SCHEMA_VERSION = 1
REPORT_DIR = "report"
SUMMARY_FILE = "summary.json"
FIGURE_FILE = "alignment.png"


def summary_dict(results: AlignmentResults, stats: AlignmentStats) -> dict[str, Any]:
    """The JSON-ready content of the summary: run metadata and every statistic."""
    series = {}
    for name, row in stats.series.items():
        entry = asdict(row)
        del entry["name"]
        entry["mean_ci"] = list(row.mean_ci) if row.mean_ci is not None else None
        series[name] = entry
    tracin = asdict(stats.tracin)
    tracin["contributions"] = [
        {"step": c.step, "value": value}
        for c, value in zip(results.checkpoints, stats.tracin.contributions, strict=True)
    ]
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "run": {
            "alignment_file": str(results.path),
            "alignment_schema_version": results.schema_version,
            "loss": results.loss,
            "item_kind": results.item_kind,
            "weight_name": results.weight_name,
            "target": asdict(results.target),
            "dtype": results.dtype,
            "attention": results.attention,
            "n_checkpoints": len(results.checkpoints),
            "steps": [int(step) for step in results.steps],
        },
        "bootstrap": {"confidence_level": stats.confidence_level, "seed": stats.bootstrap_seed},
        "series": series,
        "tracin": tracin,
        "weights": [asdict(w) for w in stats.weights],
        "checks": {**asdict(stats.checks), "failed_steps": list(stats.checks.failed_steps)},
    }


def write_summary(results: AlignmentResults, stats: AlignmentStats, path: str | Path) -> Path:
    """Write the JSON summary of a run's alignment analysis.

    Args:
        results: the loaded alignment results (for the run metadata).
        stats: their statistics from `compute_statistics`.
        path: the JSON file to write; its folder is created if needed.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary_dict(results, stats), indent=2, ensure_ascii=False, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return path


@dataclass(frozen=True)
class AnalysisReport:
    """What `analyze_run` produced: the files written and the tables to show."""

    run_dir: Path
    out_dir: Path
    summary_path: Path
    figure_path: Path
    results: AlignmentResults
    stats: AlignmentStats
    table: RenderableType
    checkpoints_table: RenderableType

    def renderables(self, per_checkpoint: bool = False) -> list[RenderableType]:
        """What the command line prints: the summary table, the estimate, the paths."""
        shown: list[RenderableType] = [self.table]
        if per_checkpoint:
            shown.append(self.checkpoints_table)
        tracin = self.stats.tracin
        lines = [Text(f"SGD (TracIn) estimate of the targets' NLL decrease: {sci(tracin.total)}")]
        if tracin.update_total is not None:
            lines.append(Text(f"same, from the applied updates: {sci(tracin.update_total)}"))
        checks = self.stats.checks
        if checks.n_failed:
            lines.append(
                Text(
                    f"parts did not add up to the whole at {checks.n_failed} checkpoint(s)",
                    style="red",
                )
            )
        lines.append(Text(f"summary: {self.summary_path}"))
        lines.append(Text(f"figure:  {self.figure_path}"))
        shown.append(Group(*lines))
        return shown


def analyze_run(run_dir: str | Path, out_dir: str | Path | None = None) -> AnalysisReport:
    """Analyse the alignment results of a run and write its report.

    Args:
        run_dir: the run directory, holding `alignment/alignment.json`.
        out_dir: folder for `summary.json` and `alignment.png`; default `RUN_DIR/report`.

    Returns:
        The paths written and the rich tables, for the command line to print.

    Raises:
        FileNotFoundError, ValueError: from `load_alignment`, when the results are
            missing or malformed.
    """
    run_dir = Path(run_dir)
    has_results = (run_dir / "alignment" / "alignment.json").exists()
    if run_dir.is_dir() and not has_results and not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir}: not a graddyn run directory (no run.json)")
    results = load_alignment(run_dir)
    stats = compute_statistics(results)

    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    summary_path = write_summary(results, stats, out / SUMMARY_FILE)
    figure_path = plot_alignment(results, out / FIGURE_FILE)

    return AnalysisReport(
        run_dir=run_dir,
        out_dir=out,
        summary_path=summary_path,
        figure_path=figure_path,
        results=results,
        stats=stats,
        table=alignment_table(results, stats),
        checkpoints_table=checkpoint_table(results),
    )
