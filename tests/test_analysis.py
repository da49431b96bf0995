"""Tests of graddyn.analysis.alignment: loading alignment results and their statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from graddyn.analysis.alignment import SERIES, load_alignment
from graddyn.analysis.statistics import (
    bootstrap_mean_ci,
    compute_statistics,
    count_sign_changes,
    fraction_positive,
    tracin_estimate,
    weight_stats,
)


def make_checkpoint(step: int, whole: float, lr: float = 1e-5, since: int = 10) -> dict:
    """A checkpoint with made-up but self-consistent values (parts add up to the whole)."""
    positive, negative = 2.0 * whole + 0.01, -whole - 0.01
    groups = {
        name: {"whole": share * whole, "positive": share * positive, "negative": share * negative}
        for name, share in (("top", 0.5), ("middle", 0.3), ("bottom", 0.2))
    }
    return {
        "step": step,
        "learning_rate": lr,
        "steps_since_previous": since,
        "alignment": {
            "whole": whole,
            "whole_from_parts": whole,
            "positive": positive,
            "negative": negative,
            "control_mean_weight": 0.9 * whole,
            "groups": groups,
        },
        "check": {"parts_error": 1e-10, "tolerance": 1e-7},
        "extras": {
            "loss_grad_norm": 1.2,
            "target_grad_norm": 3.4,
            "cosine": whole / (1.2 * 3.4),
            "update_alignment": 0.5 * whole,
        },
        "weights": {"top": [0.9, 0.8, 0.7], "middle": [0.5, 0.45], "bottom": [0.2, 0.1]},
    }


def make_results(wholes: list[float], loss: str = "dpo") -> dict[str, Any]:
    """An alignment.json document with one checkpoint per value of `wholes`."""
    return {
        "schema_version": 1,
        "loss": loss,
        "weight_name": "omega" if loss == "dpo" else "abs_advantage",
        "target": {"kind": "final_responses", "n_targets": 32, "description": "test"},
        "dtype": "float32",
        "attention": "sdpa-math",
        "checkpoints": [make_checkpoint(10 * (k + 1), w) for k, w in enumerate(wholes)],
    }


def write_run(run_dir: Path, document: dict[str, Any]) -> Path:
    path = run_dir / "alignment" / "alignment.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return run_dir


def test_missing_file_names_path_and_replay(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"alignment\.json: no alignment results.*replay"):
        load_alignment(tmp_path)


def test_malformed_json_names_file(tmp_path: Path) -> None:
    path = tmp_path / "alignment" / "alignment.json"
    path.parent.mkdir()
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"alignment\.json: not valid JSON \(line 1"):
        load_alignment(tmp_path)


def test_missing_field_names_file_and_field(tmp_path: Path) -> None:
    document = make_results([0.1, 0.2, 0.3, 0.4])
    del document["checkpoints"][3]["alignment"]["positive"]
    write_run(tmp_path, document)
    with pytest.raises(ValueError) as error:
        load_alignment(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "alignment" / "alignment.json") in message
    assert message.endswith("checkpoints[3].alignment.positive: missing")


@pytest.mark.parametrize(
    ("edit", "field", "problem"),
    [
        (
            lambda d: d["checkpoints"][0]["alignment"]["groups"]["middle"].update(negative="x"),
            "checkpoints[0].alignment.groups.middle.negative",
            "expected a number",
        ),
        (
            lambda d: d["checkpoints"][1]["weights"]["top"].append(None),
            "checkpoints[1].weights.top[3]",
            "expected a number",
        ),
        (lambda d: d.update(schema_version=2), "schema_version", "reads version 1"),
        (lambda d: d["target"].pop("kind"), "target.kind", "missing"),
        (lambda d: d.update(checkpoints=[]), "checkpoints", "empty"),
        (
            lambda d: d["checkpoints"][1].update(step=5),
            "checkpoints[1].step",
            "does not come after",
        ),
        (
            lambda d: d["checkpoints"][0]["extras"].update(cosine=float("nan")),
            "checkpoints[0].extras.cosine",
            "finite",
        ),
    ],
)
def test_bad_field_is_named(tmp_path: Path, edit, field: str, problem: str) -> None:
    document = make_results([0.1, 0.2])
    edit(document)
    write_run(tmp_path, document)
    with pytest.raises(ValueError) as error:
        load_alignment(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'alignment' / 'alignment.json'}: {field}: ")
    assert problem in str(error.value)


def test_load_types_and_null_update_alignment(tmp_path: Path) -> None:
    document = make_results([0.1, -0.2, 0.3], loss="ppo")
    document["checkpoints"][2]["extras"]["update_alignment"] = None
    results = load_alignment(write_run(tmp_path, document))
    assert results.item_kind == "token"
    assert results.weight_symbol == "|Â|"
    assert results.steps.tolist() == [10, 20, 30]
    np.testing.assert_allclose(results.series("whole"), [0.1, -0.2, 0.3])
    np.testing.assert_allclose(results.series("top.whole"), [0.05, -0.1, 0.15])
    assert results.checkpoints[2].extras.update_alignment is None
    assert results.checkpoints[0].all_weights().size == 7
    assert tracin_estimate(results).update_total is None
    with pytest.raises(KeyError, match="unknown series"):
        results.series("sideways")


def test_fraction_and_sign_changes_on_hand_made_series() -> None:
    values = np.array([1.0, -1.0, 0.0, 2.0, 3.0])
    assert fraction_positive(values) == pytest.approx(3 / 5)
    assert count_sign_changes(values) == 2
    assert count_sign_changes(np.array([0.0, 0.0])) == 0
    assert count_sign_changes(np.array([-1.0, 0.0, -2.0, 1.0, 0.0, -1.0])) == 2


def test_bootstrap_ci_contains_mean_and_is_reproducible() -> None:
    values = np.random.default_rng(1).normal(0.01, 0.02, size=20)
    low, high = bootstrap_mean_ci(values, n_resamples=2000)
    assert low < values.mean() < high
    assert bootstrap_mean_ci(values, n_resamples=2000) == (low, high)
    assert bootstrap_mean_ci(values[:2]) is None
    assert bootstrap_mean_ci(np.full(4, 0.5)) == (0.5, 0.5)


def test_tracin_sum(tmp_path: Path) -> None:
    document = make_results([0.1, -0.2, 0.4])
    document["checkpoints"][1]["learning_rate"] = 2e-5
    document["checkpoints"][2]["steps_since_previous"] = 5
    estimate = tracin_estimate(load_alignment(write_run(tmp_path, document)))
    expected = 1e-5 * 10 * 0.1 + 2e-5 * 10 * -0.2 + 1e-5 * 5 * 0.4
    assert estimate.total == pytest.approx(expected, rel=1e-12)
    assert sum(estimate.contributions) == pytest.approx(expected, rel=1e-12)
    assert estimate.update_total == pytest.approx(0.5 * expected, rel=1e-12)
    assert "SGD" in estimate.label


def test_statistics_of_every_series(tmp_path: Path) -> None:
    wholes = [1.0, -1.0, 0.0, 2.0, 3.0]
    stats = compute_statistics(load_alignment(write_run(tmp_path, make_results(wholes))))
    assert set(stats.series) == set(SERIES)
    whole = stats.series["whole"]
    assert (whole.n_checkpoints, whole.sign_changes) == (5, 2)
    assert whole.fraction_positive == pytest.approx(0.6)
    assert whole.mean == pytest.approx(1.0)
    assert (whole.first, whole.last) == (1.0, 3.0)
    assert whole.mean_ci is not None and whole.mean_ci[0] <= 1.0 <= whole.mean_ci[1]
    assert whole.tracin == pytest.approx(stats.tracin.total)
    parts = stats.series["positive"].tracin + stats.series["negative"].tracin
    assert parts == pytest.approx(whole.tracin)
    assert stats.checks.n_failed == 0


def test_weight_distribution_statistics(tmp_path: Path) -> None:
    stats = compute_statistics(load_alignment(write_run(tmp_path, make_results([0.1]))))
    batch = stats.weights[0]
    values = np.array([0.9, 0.8, 0.7, 0.5, 0.45, 0.2, 0.1])
    assert batch.step == 10
    assert batch.all is not None
    assert batch.all.count == 7
    assert batch.all.mean == pytest.approx(values.mean())
    assert batch.all.std == pytest.approx(values.std())
    assert (batch.all.min, batch.all.median, batch.all.max) == (0.1, 0.5, 0.9)
    assert batch.all.q25 == pytest.approx(np.quantile(values, 0.25))
    assert batch.groups["middle"].mean == pytest.approx(0.475)
    assert weight_stats(np.array([])) is None


def test_one_checkpoint(tmp_path: Path) -> None:
    stats = compute_statistics(load_alignment(write_run(tmp_path, make_results([-0.1]))))
    whole = stats.series["whole"]
    assert whole.mean_ci is None
    assert whole.sign_changes == 0
    assert whole.fraction_positive == 0.0
    assert math.isclose(stats.tracin.total, 1e-5 * 10 * -0.1)


def test_failed_check_is_counted_and_logged(tmp_path: Path, caplog) -> None:
    document = make_results([0.1, 0.2])
    document["checkpoints"][1]["check"]["parts_error"] = 1e-3
    stats = compute_statistics(load_alignment(write_run(tmp_path, document)))
    assert stats.checks.failed_steps == (20,)
    assert stats.checks.max_parts_error == 1e-3
    assert "did not add up" in caplog.text
