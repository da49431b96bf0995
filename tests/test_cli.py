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
    def analyze(path):
        return subprocess.run(
            [sys.executable, "-m", "graddyn.cli", "analyze", str(path)],
            capture_output=True,
            text=True,
        )

    completed = analyze(tmp_path)
    assert completed.returncode == 2
    assert len(completed.stderr.strip().splitlines()) == 1
    assert "no run.json" in completed.stderr
    (tmp_path / "run.json").write_text("{}")
    completed = analyze(tmp_path)
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


def test_every_subpackage_is_packaged():
    """A normal (non-editable) install must ship every package of the source tree."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(root).parts) for p in root.glob("graddyn/**/__init__.py")
    }
    found.add("graddyn.cli")
    assert found <= listed, found - listed


def test_capture_refuses_a_used_run_directory(tiny_model_dir, tmp_path):
    args = [
        "capture",
        "--run-dir",
        str(tmp_path),
        "--model",
        tiny_model_dir,
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--max-prompt-tokens",
        "8",
        "--max-response-tokens",
        "4",
    ]
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, args + ["--overwrite"])
    assert isinstance(result.exception, FileExistsError)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "notes.txt").unlink()
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, args)
    assert isinstance(result.exception, FileExistsError) and "--overwrite" in str(result.exception)
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0


def test_cli_rejects_bad_options_in_one_line(tmp_path):
    for args in (
        ["capture", "--capture-every", "0"],
        ["capture", "--device", "cuda:7"],
        ["capture", "--model", "/nonexistent/model", "--steps", "1"],
    ):
        completed = subprocess.run(
            [sys.executable, "-m", "graddyn.cli", *args, "--run-dir", str(tmp_path / "r")],
            capture_output=True,
            text=True,
        )
        assert completed.returncode == 2, args
        assert "Traceback" not in completed.stderr, args
