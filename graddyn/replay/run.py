"""Replay every checkpoint of a run and compute the exact gradient alignment G.

For each captured step t, with the parameters θ_t saved before its optimizer step:

1. g' = ∇ mean_{D'} (-log π(y'|x'))  (one backward pass over the targets);
2. δ_i = ⟨∇ log π_i, g'⟩ for every item of the step's effective batch (one forward-mode
   pass over the stored sequences), so each part of G is `-Σ_{i in part} c_i · δ_i`
   with `c_i = scale · sign_i · weight_i` as stored at capture;
3. G of the whole loss from reverse-mode autograd, independently of the δ_i: of the
   actual loss where graddyn knows it (`-log σ(h)` for DPO), else of the items' surrogate;
4. the update alignment ⟨g', θ_t - θ_{t+1}⟩ / η_t from the stored applied update.

Only the shards, checkpoints and targets are read: the sequences come from the tokens
stored in each shard, so neither the data set nor the tokenizer is needed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from graddyn.capture.exact import (
    ATTENTION_BACKEND,
    directional_token_logprobs,
    dot,
    target_gradient,
)
from graddyn.checkpoints import load_parameters
from graddyn.items import regroup
from graddyn.models import load_model
from graddyn.replay.parts import ItemAlignment, alignment_parts, group_weights
from graddyn.replay.sequences import pad_id_of, stored_sequences
from graddyn.replay.whole import whole_loss_gradient
from graddyn.store.manifest import read_manifest
from graddyn.store.shard import (
    SCHEMA_VERSION,
    Shard,
    ShardRecord,
    list_shards,
    read_shard,
    write_shard,
)
from graddyn.targets import TargetSet, load_targets

logger = logging.getLogger(__name__)

ALIGNMENT_DIR = "alignment"


def item_deltas(
    model, shard: Shard, direction, chunk: int, device
) -> tuple[np.ndarray, np.ndarray]:
    """(log π_i, δ_i) of every item of the shard, from one forward-mode pass per chunk."""
    flat, row_of = stored_sequences(shard)
    token_logp: list[np.ndarray] = []
    token_delta: list[np.ndarray] = []
    for start in range(0, len(flat), chunk):
        rows = list(range(start, min(start + chunk, len(flat))))
        batch = flat.batch(rows, pad_id_of(model)).to(device)
        logp, delta = directional_token_logprobs(model, batch, direction)
        for index in range(len(rows)):
            real = batch.attention_mask[index].bool()
            token_logp.append(logp[index][real].double().cpu().numpy())
            token_delta.append(delta[index][real].double().cpu().numpy())

    sequence_id = shard.arrays["items/sequence_id"]
    token_index = shard.arrays["items/token_index"]
    logp_items = np.empty(len(sequence_id))
    delta_items = np.empty(len(sequence_id))
    for i, (sid, token) in enumerate(zip(sequence_id.tolist(), token_index.tolist(), strict=True)):
        row = row_of[sid]
        if token < 0:
            logp_items[i], delta_items[i] = token_logp[row].sum(), token_delta[row].sum()
        else:
            logp_items[i], delta_items[i] = token_logp[row][token], token_delta[row][token]
    return logp_items, delta_items


def replay_run(
    run_dir: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    chunk_size: int = 8,
    on_checkpoint: Callable[[int, int], None] | None = None,
) -> Path:
    """Compute exact alignment for every checkpoint of `run_dir`; returns the JSON path."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    run = manifest["run"]
    model = load_model(run["model"], dtype, device)
    targets = load_targets(run_dir)
    shards = list_shards(run_dir / "shards")
    if not shards:
        raise FileNotFoundError(f"{run_dir}/shards: no shards; the run captured nothing")

    records = []
    for index, path in enumerate(shards):
        shard = read_shard_checked(path)
        records.append(replay_checkpoint(run_dir, model, shard, targets, chunk_size, device))
        if on_checkpoint is not None:
            on_checkpoint(index + 1, len(shards))
    result = {
        "schema_version": SCHEMA_VERSION,
        "loss": run.get("loss", "items"),
        "weight_name": run.get("weight_name", "weight"),
        "target": {
            "kind": "final_responses",
            "n_targets": len(targets),
            "description": targets.description,
        },
        "dtype": dtype,
        "attention": ATTENTION_BACKEND,
        "checkpoints": records,
    }
    out = run_dir / ALIGNMENT_DIR / "alignment.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def read_shard_checked(path: Path) -> Shard:
    """A shard with what replay needs, or an error naming the shard and the missing part."""
    shard = read_shard(path)
    for key in ("sequences/tokens", "items/coefficient", "items/scale", "items/sequence_id"):
        if key not in shard.arrays:
            raise ValueError(f"{path}: dataset {key} is missing; replay cannot rebuild the step")
    if not shard.attrs.get("checkpoint"):
        raise ValueError(f"{path}: the run stored no checkpoint; replay needs checkpoints")
    return shard


def replay_checkpoint(
    run_dir: Path, model, shard: Shard, targets: TargetSet, chunk: int, device
) -> dict:
    """Exact G of every part at one checkpoint; also writes its per-item values."""
    load_parameters(model, run_dir / shard.attrs["checkpoint"])
    direction = target_gradient(model, targets.sequences, pad_id_of(model), chunk)
    logp, delta = item_deltas(model, shard, direction, chunk, device)
    a = shard.arrays
    group = regroup(
        torch.from_numpy(a["items/weight"]), torch.from_numpy(a["items/unit_id"])
    ).numpy()
    items = ItemAlignment(
        a["items/coefficient"],
        a["items/weight"],
        a["items/sign"],
        group,
        a["items/unit_id"],
        delta,
        a["items/scale"],
    )
    parts = alignment_parts(items)
    whole_source, loss_grad = whole_loss_gradient(model, shard, chunk, device)
    whole = dot(loss_grad, direction)
    update_alignment = _update_alignment(run_dir, shard, direction)
    loss_norm, target_norm = dot(loss_grad, loss_grad) ** 0.5, dot(direction, direction) ** 0.5

    write_shard(
        run_dir / ALIGNMENT_DIR / f"step_{shard.step:08d}.h5",
        ShardRecord(
            step=shard.step,
            attrs={"whole": whole, "whole_source": whole_source},
            arrays={
                "sequence_id": a["items/sequence_id"],
                "token_index": a["items/token_index"],
                "delta": delta,
                "coefficient": a["items/coefficient"],
                "weight": a["items/weight"],
                "sign": a["items/sign"],
                "group": group,
                "logp_replay": logp,
                "logp_captured": a["items/logp"],
            },
        ),
    )
    return {
        "step": shard.step,
        "learning_rate": float(shard.attrs["learning_rate"]),
        "steps_since_previous": int(shard.attrs["steps_since_previous"]),
        "alignment": {"whole": whole, **parts},
        "check": {
            "whole_source": whole_source,
            "parts_error": abs(whole - parts["whole_from_parts"]),
            "tolerance": 1e-6 * float(np.abs(a["items/coefficient"] * delta).sum()),
            "max_logp_drift": float(np.abs(logp - a["items/logp"]).max()),
        },
        "extras": {
            "loss_grad_norm": loss_norm,
            "target_grad_norm": target_norm,
            "cosine": whole / (loss_norm * target_norm) if loss_norm * target_norm else 0.0,
            "update_alignment": update_alignment,
        },
        "weights": group_weights(items),
    }


def _update_alignment(run_dir: Path, shard: Shard, direction) -> float | None:
    """⟨g', θ_t - θ_{t+1}⟩ / η_t from the stored update, or None without one."""
    lr = float(shard.attrs["learning_rate"])
    name = shard.attrs.get("update")
    if not name or lr <= 0 or not (run_dir / name).exists():
        return None
    update = load_file(str(run_dir / name))
    return -dot({n: update[n] for n in direction}, direction) / lr
