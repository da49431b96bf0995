"""The docs build without warnings and name every CLI command and public function."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graddyn
from graddyn.cli.app import app
from graddyn.items import WHOLE_SEQUENCE, Items, assign_groups
from graddyn.logprobs import sequence_logprobs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocstrings")
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "WARNING" not in completed.stderr


def test_cli_reference_is_generated_from_the_cli(tmp_path):
    typer = shutil.which("typer", path=str(Path(sys.executable).parent))
    assert typer, "the typer command ships with typer"
    out = tmp_path / "cli.md"
    subprocess.run(
        [
            typer,
            "graddyn.cli.app",
            "utils",
            "docs",
            "--name",
            "graddyn",
            "--title",
            "Command line",
            "--output",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    assert out.read_text() == (DOCS / "cli.md").read_text(), (
        "docs/cli.md is stale: regenerate it with `typer graddyn.cli.app utils docs "
        "--name graddyn --title 'Command line' --output docs/cli.md`"
    )


def test_every_command_and_public_name_is_documented():
    cli = (DOCS / "cli.md").read_text()
    for command in app.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        assert f"## `graddyn {name}`" in cli, name
    api = (DOCS / "api.md").read_text()
    for name in graddyn.__all__:
        if name != "__version__":
            assert f".{name}\n" in api, name


def test_own_loss_page_example_verifies(tiny_model, tiny_sequences, tokenizer, tmp_path):
    """The IPO items of docs/own-loss.md describe the IPO loss (the session checks it)."""
    from graddyn.capture.session import CaptureConfig, CaptureSession
    from graddyn.data.collate import collate_sequences

    n, tau = 2, 0.5
    ids = torch.tensor([3, 7])
    batch = collate_sequences(
        tiny_sequences[0:4:2] + tiny_sequences[1:4:2], tokenizer.eos_token_id
    )
    ref_chosen, ref_rejected = torch.tensor([-50.0, -40.0]), torch.tensor([-45.0, -41.0])
    session = CaptureSession(
        tiny_model, tmp_path, CaptureConfig(every=1, checkpoints=False), total_steps=1
    )
    session.start_step(0)
    logp = sequence_logprobs(tiny_model, batch)
    chosen, rejected = logp[:n], logp[n:]
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    weight = (2 * (margin - 1 / (2 * tau))).detach()
    loss = ((margin - 1 / (2 * tau)) ** 2).mean()
    items = Items(
        logp=logp,
        weight=torch.cat([-weight, -weight]),
        sign=torch.cat([torch.ones(n), -torch.ones(n)]).to(torch.int8),
        group=torch.cat([assign_groups(weight.abs(), ids)] * 2),
        sequence_id=torch.cat([2 * ids, 2 * ids + 1]),
        token_index=torch.full((2 * n,), WHOLE_SEQUENCE),
        scale=1.0 / n,
        unit_id=torch.cat([ids, ids]),
        normalizer=n,
    )
    session.observe(items, loss, batch, rows=items.sequence_id)
    loss.backward()
    session.end_step({"pair_ids": ids}, learning_rate=0.0)
    session.close()
