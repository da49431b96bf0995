"""Read a run directory: the manifest, shards, training log, targets and alignment.

    run = RunReader("runs/demo")
    for step in run.steps:
        items = run.items(step)            # weight, sign, coefficient, group, logp, ...
        ids, grads = run.per_sequence_gradients(step)
    g = run.alignment()["checkpoints"]     # exact G per checkpoint, after `graddyn replay`

Everything comes back as numpy arrays, Python strings and dicts; no torch needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from graddyn.store.manifest import read_manifest
from graddyn.store.shard import Shard, list_shards, read_shard, shard_name


class RunReader:
    """Read-only access to a run directory written by a capture session."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.manifest = read_manifest(self.run_dir)

    @property
    def steps(self) -> list[int]:
        """Captured steps with a complete shard, in order."""
        return [int(p.stem.removeprefix("step_")) for p in list_shards(self.run_dir / "shards")]

    def shard(self, step: int) -> Shard:
        path = self.run_dir / "shards" / shard_name(step)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: step {step} was not captured; captured: {self.steps}"
            )
        return read_shard(path)

    def shards(self) -> Iterator[Shard]:
        for step in self.steps:
            yield self.shard(step)

    def items(self, step: int) -> dict[str, np.ndarray]:
        """Per-item arrays of a step (`items/<name>` without the prefix)."""
        arrays = self.shard(step).arrays
        return {k.removeprefix("items/"): v for k, v in arrays.items() if k.startswith("items/")}

    def per_sequence_gradients(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(sequence ids, (n, K) projected per-sequence gradients) of a step."""
        arrays = self.shard(step).arrays
        if "grads/per_sequence" not in arrays:
            raise KeyError(f"step {step}: the run stored no per-sequence gradients")
        return arrays["grads/sequence_id"], arrays["grads/per_sequence"]

    def train_log(self) -> list[dict]:
        """The per-step metrics the training loop logged, if it wrote `train_log.jsonl`."""
        path = self.run_dir / "train_log.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def alignment(self) -> dict:
        """`alignment/alignment.json`, written by `graddyn replay`."""
        path = self.run_dir / "alignment" / "alignment.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no alignment results; run `graddyn replay {self.run_dir}` first"
            )
        return json.loads(path.read_text())

    def item_alignment(self, step: int) -> dict[str, np.ndarray]:
        """Per-item δ, coefficient, weight, sign and group of a replayed step."""
        path = self.run_dir / "alignment" / shard_name(step)
        if not path.exists():
            raise FileNotFoundError(f"{path}: step {step} was not replayed")
        return read_shard(path).arrays
