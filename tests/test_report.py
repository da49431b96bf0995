"""Tests of graddyn.report: figure, tables, JSON summary and `analyze_run`."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table

from graddyn.analysis.alignment import SERIES, load_alignment
from graddyn.analysis.statistics import compute_statistics
from graddyn.report import (
    alignment_table,
    analyze_run,
    checkpoint_table,
    choose_yscale,
    plot_alignment,
    sci,
    summary_dict,
    write_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(run_dir: Path, wholes: list[float], n_items: int = 9) -> Path:
    """Write a made-up alignment.json with one checkpoint per value of `wholes`."""
    rng = np.random.default_rng(0)
    checkpoints = []
    for k, whole in enumerate(wholes):
        positive = 0.02 + whole
        weights = np.sort(rng.uniform(0, 1, n_items))[::-1]
        size = n_items // 3
        checkpoints.append(
            {
                "step": 5 * (k + 1),
                "learning_rate": 1e-5,
                "steps_since_previous": 5,
                "alignment": {
                    "whole": whole,
                    "whole_from_parts": whole,
                    "positive": positive,
                    "negative": -0.02,
                    "control_mean_weight": 0.8 * whole,
                    "groups": {
                        group: {
                            "whole": whole / 3,
                            "positive": positive / 3,
                            "negative": -0.02 / 3,
                        }
                        for group in ("top", "middle", "bottom")
                    },
                },
                "check": {"parts_error": 1e-11, "tolerance": 1e-8},
                "extras": {
                    "loss_grad_norm": 2.0,
                    "target_grad_norm": 5.0,
                    "cosine": whole / 10,
                    "update_alignment": None,
                },
                "weights": {
                    "top": weights[:size].tolist(),
                    "middle": weights[size : 2 * size].tolist(),
                    "bottom": weights[2 * size :].tolist(),
                },
            }
        )
    document: dict[str, Any] = {
        "schema_version": 1,
        "loss": "dpo",
        "weight_name": "omega",
        "target": {"kind": "final_responses", "n_targets": 16, "description": "made up"},
        "dtype": "float32",
        "attention": "sdpa-math",
        "checkpoints": checkpoints,
    }
    path = run_dir / "alignment" / "alignment.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return run_dir


def render(renderable: object) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_figure_is_a_png(tmp_path: Path) -> None:
    results = load_alignment(make_run(tmp_path, [0.01, -0.002, 0.004, 0.003]))
    path = plot_alignment(results, tmp_path / "figs" / "alignment.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 20_000


def test_figure_with_many_checkpoints_and_symlog(tmp_path: Path) -> None:
    wholes = (1e-5 * np.sin(np.arange(50))).tolist()
    results = load_alignment(make_run(tmp_path, wholes))
    path = plot_alignment(results, tmp_path / "alignment.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_choose_yscale_rule() -> None:
    assert choose_yscale([np.array([0.1, 0.2]), np.array([0.001, 0.002])]) == ("linear", None)
    assert choose_yscale([np.array([0.01, -0.02]), np.array([0.005])]) == ("linear", None)
    scale, linthresh = choose_yscale([np.array([0.03, 0.02]), np.array([2e-4, -3e-4])])
    assert scale == "symlog"
    assert linthresh == pytest.approx(1e-4)


def test_sci_has_three_significant_digits() -> None:
    assert sci(0.0123456) == "0.0123"
    assert sci(-1234.0) == "-1.23e+03"
    assert sci(1.6e-05) == "1.6e-05"
    assert sci(None) == "–"


def test_tables_show_every_series_and_checkpoint(tmp_path: Path) -> None:
    results = load_alignment(make_run(tmp_path, [0.01, -0.002, 0.004]))
    stats = compute_statistics(results)
    table = alignment_table(results, stats)
    assert isinstance(table, Table)
    assert table.row_count == len(SERIES)
    text = render(table)
    assert "2/3" in text
    assert sci(stats.series["whole"].mean) in text
    per_checkpoint = checkpoint_table(results)
    assert per_checkpoint.row_count == 3
    assert "ok" in render(per_checkpoint)


def test_summary_round_trip(tmp_path: Path) -> None:
    results = load_alignment(make_run(tmp_path, [0.01, -0.002, 0.004, 0.003]))
    stats = compute_statistics(results)
    path = write_summary(results, stats, tmp_path / "out" / "summary.json")
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert loaded == json.loads(json.dumps(summary_dict(results, stats)))
    assert loaded["run"]["loss"] == "dpo"
    assert loaded["run"]["item_kind"] == "pair"
    assert loaded["run"]["steps"] == [5, 10, 15, 20]
    whole = loaded["series"]["whole"]
    assert whole["mean"] == pytest.approx(stats.series["whole"].mean)
    assert whole["mean_ci"] == pytest.approx(list(stats.series["whole"].mean_ci))
    assert whole["sign_changes"] == 2
    assert loaded["tracin"]["total"] == pytest.approx(stats.tracin.total)
    assert "SGD" in loaded["tracin"]["label"]
    assert [c["step"] for c in loaded["tracin"]["contributions"]] == [5, 10, 15, 20]
    assert loaded["tracin"]["update_total"] is None
    assert loaded["weights"][0]["all"]["count"] == 9
    assert set(loaded["weights"][0]["groups"]) == {"top", "middle", "bottom"}


def test_analyze_run_writes_report(tmp_path: Path) -> None:
    report = analyze_run(make_run(tmp_path, [0.01, -0.002, 0.004]))
    assert report.summary_path == tmp_path / "report" / "summary.json"
    assert report.figure_path == tmp_path / "report" / "alignment.png"
    assert report.figure_path.read_bytes().startswith(PNG_MAGIC)
    assert json.loads(report.summary_path.read_text())["run"]["n_checkpoints"] == 3
    text = "".join(render(r) for r in report.renderables(per_checkpoint=True))
    assert str(report.summary_path) in text
    assert "SGD (TracIn) estimate" in text


def test_analyze_run_one_checkpoint_and_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    report = analyze_run(make_run(tmp_path / "run", [-0.003], n_items=2), out_dir=out)
    assert report.figure_path == out / "alignment.png"
    assert report.figure_path.stat().st_size > 20_000
    summary = json.loads(report.summary_path.read_text())
    assert summary["series"]["whole"]["mean_ci"] is None
    assert summary["weights"][0]["groups"]["bottom"]["count"] == 2
    assert summary["weights"][0]["groups"]["top"] is None
    assert "n<3" in render(report.table)


def test_analyze_run_without_results(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a graddyn run"):
        analyze_run(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="graddyn replay"):
        analyze_run(tmp_path)
