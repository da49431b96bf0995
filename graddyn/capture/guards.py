"""Checks a capture session makes before it records anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from graddyn.items import Items


def prepare_run_dir(run_dir: str | Path, overwrite: bool) -> Path:
    """An empty run directory: a new one, or an earlier run cleared when `overwrite`.

    Capturing into a directory that already holds files would mix two runs' shards, so
    it is refused unless the directory is a graddyn run and `overwrite` is set.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{run_dir}: not empty; choose a new run directory or "
                "overwrite the earlier run (--overwrite)"
            )
        if not (run_dir / "run.json").exists():
            raise FileExistsError(
                f"{run_dir}: not empty and not a graddyn run; refusing to overwrite it"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def verify_items(items: Items, loss: torch.Tensor, rtol: float = 1e-4) -> None:
    """Raise if `∂loss/∂items.logp` is not `-items.coefficient` (items misdescribe the loss)."""
    if not items.logp.requires_grad:
        raise ValueError("items.logp carries no gradient: pass the log-probs the loss uses")
    (grad,) = torch.autograd.grad(loss, items.logp, retain_graph=True, allow_unused=True)
    if grad is None:
        raise ValueError("the loss does not depend on items.logp: compute it from items.logp")
    expected = -items.coefficient.to(grad.dtype)
    scale = expected.abs().max().clamp(min=torch.finfo(grad.dtype).tiny)
    error = (grad - expected).abs()
    if (error > rtol * scale).any():
        index = int(error.argmax())
        raise ValueError(
            f"items do not describe the loss: at item {index} d loss/d logp = "
            f"{grad[index].item():.6g}, but -scale*sign*weight = {expected[index].item():.6g}"
        )
