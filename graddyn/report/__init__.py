"""Report of the offline analysis: figure, rich tables and JSON summary of a run."""

from graddyn.report.figures import choose_yscale, plot_alignment
from graddyn.report.summary import AnalysisReport, analyze_run, summary_dict, write_summary
from graddyn.report.tables import alignment_table, checkpoint_table, sci

__all__ = [
    "AnalysisReport",
    "alignment_table",
    "analyze_run",
    "checkpoint_table",
    "choose_yscale",
    "plot_alignment",
    "sci",
    "summary_dict",
    "write_summary",
]
