"""The command line on a tiny config: capture, targets, replay, analyze; bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

from typer.testing import CliRunner

from graddyn.cli.app import app

runner = CliRunner()


def test_cli_end_to_end(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "capture",
            "--run-dir",
            str(run_dir),
            "--model",
            tiny_model_dir,
            "--steps",
            "3",
            "--batch-size",
            "3",
            "--capture-every",
            "2",
            "--max-prompt-tokens",
            "16",
            "--max-response-tokens",
            "8",
            "--projection-dim",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["targets", str(run_dir), "--prompts", "2", "--max-new-tokens", "4"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["replay", str(run_dir)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["analyze", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "positive" in result.output
    assert (run_dir / "report" / "alignment.png").stat().st_size > 10_000
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary


def test_cli_reports_bad_input_in_one_line(tmp_path):
    bad = tmp_path / "pairs.jsonl.gz"
    with gzip.open(bad, "wt") as handle:
        handle.write("{not json\n")
    completed = subprocess.run(
        [sys.executable, "-m", "graddyn.cli", "check-data", str(bad)],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert len(completed.stderr.strip().splitlines()) == 1
    assert str(bad) in completed.stderr
    assert "line 1" in completed.stderr
    assert "Traceback" not in completed.stdout + completed.stderr


def test_cli_analyze_without_results_names_the_file(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "graddyn.cli", "analyze", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert len(completed.stderr.strip().splitlines()) == 1
    assert "alignment.json" in completed.stderr


def test_cli_capture_ppo(tiny_model_dir, tokenizer, tmp_path):
    from graddyn.reward import RewardModel, save_reward_model

    reward_dir = tmp_path / "reward"
    save_reward_model(RewardModel.from_base(tiny_model_dir), tokenizer, reward_dir)
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "capture",
            "--algo",
            "ppo",
            "--run-dir",
            str(run_dir),
            "--model",
            tiny_model_dir,
            "--reward-model",
            str(reward_dir),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--capture-every",
            "1",
            "--max-prompt-tokens",
            "16",
            "--max-response-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (run_dir / "shards" / "step_00000001.h5").exists()
    result = runner.invoke(app, ["capture", "--algo", "sft", "--run-dir", str(tmp_path / "x")])
    assert isinstance(result.exception, ValueError)
