"""Replay every checkpoint of a run and compute the exact gradient alignment G.

For each captured step t, with the parameters θ_t saved before its optimizer step:

1. g' = ∇ mean_{D'} (-log π(y'|x'))  (one backward pass over the targets);
2. δ_i = ⟨∇ log π_i, g'⟩ for every item of the step's effective batch (one forward-mode
   pass), so each part of G is `-Σ_{i in part} coefficient_i · δ_i`;
3. G of the whole loss from reverse-mode autograd of the actual loss (`-log σ(h)` for
   DPO), independently of the δ_i, as the check that the parts add up;
4. the update alignment ⟨g', θ_t - θ_{t+1}⟩ / η_t from the stored applied update.

Results go to `alignment/alignment.json` (G per component, group and control) and
`alignment/step_*.h5` (δ, weights, signs and groups per item, for offline analysis).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from graddyn.capture.exact import (
    ATTENTION_BACKEND,
    directional_logprobs,
    dot,
    exact_attention,
    target_gradient,
    trainable_parameters,
)
from graddyn.checkpoints import load_parameters
from graddyn.data.batches import PairTokenizer
from graddyn.data.pairs import load_pairs
from graddyn.items import GROUP_NAMES, regroup
from graddyn.logprobs import sequence_logprobs
from graddyn.losses.dpo import dpo_loss
from graddyn.models import load_model, load_tokenizer
from graddyn.store.manifest import read_manifest
from graddyn.store.shard import (
    SCHEMA_VERSION,
    Shard,
    ShardRecord,
    list_shards,
    read_shard,
    write_shard,
)
from graddyn.targets import load_targets

logger = logging.getLogger(__name__)

ALIGNMENT_DIR = "alignment"


@dataclass
class ItemAlignment:
    """Per-item values at one checkpoint, in the order of the shard's items."""

    coefficient: np.ndarray
    weight: np.ndarray
    sign: np.ndarray
    group: np.ndarray
    unit_id: np.ndarray
    delta: np.ndarray
    scale: float

    def part(self, mask: np.ndarray, coefficient: np.ndarray | None = None) -> float:
        """G of the items in `mask`: -Σ coefficient_i δ_i."""
        c = self.coefficient if coefficient is None else coefficient
        return float(-(c[mask] * self.delta[mask]).sum())


def alignment_parts(items: ItemAlignment) -> dict:
    """G of the components, the groups, group x component and the mean-weight control."""
    everything = np.ones_like(items.sign, dtype=bool)
    positive, negative = items.sign > 0, items.sign < 0
    _, first = np.unique(items.unit_id, return_index=True)
    mean_weight = items.weight[first].mean()
    control = items.scale * items.sign * mean_weight
    groups = {}
    for index, name in enumerate(GROUP_NAMES):
        in_group = items.group == index
        groups[name] = {
            "whole": items.part(in_group),
            "positive": items.part(in_group & positive),
            "negative": items.part(in_group & negative),
        }
    return {
        "whole_from_parts": items.part(everything),
        "positive": items.part(positive),
        "negative": items.part(negative),
        "control_mean_weight": items.part(everything, control),
        "groups": groups,
    }


class DPOReplay:
    """Rebuilds a DPO step from its shard and evaluates its items and loss."""

    def __init__(self, manifest: dict, tokenizer) -> None:
        run = manifest["run"]
        self.beta = float(run["beta"])
        pairs = load_pairs(run["data"]).pairs
        self.pairs = PairTokenizer(
            tokenizer, pairs, run["max_prompt_tokens"], run["max_response_tokens"]
        )

    def deltas(self, model, shard: Shard, direction, chunk: int, device) -> tuple:
        """(log π, δ) per item, in the shard's item order (chosen of all pairs, then ...)."""
        pair_ids = shard.arrays["batch/pair_ids"].tolist()
        index = {sid: i for i, sid in enumerate(shard.arrays["items/sequence_id"].tolist())}
        logp = np.zeros(len(index))
        delta = np.zeros(len(index))
        for start in range(0, len(pair_ids), chunk):
            ids = pair_ids[start : start + chunk]
            batch = self.pairs.batch(ids).to(device)
            lp, d = directional_logprobs(model, batch, direction)
            rows = [2 * p for p in ids] + [2 * p + 1 for p in ids]
            for row, sid in enumerate(rows):
                logp[index[sid]], delta[index[sid]] = lp[row].item(), d[row].item()
        return logp, delta

    def loss_gradient(self, model, shard: Shard, chunk: int, device) -> tuple:
        """(loss, ∇θ loss) of the actual DPO loss over the effective batch, by autograd."""
        pair_ids = shard.arrays["batch/pair_ids"].tolist()
        reference = dict(
            zip(
                shard.arrays["items/sequence_id"].tolist(),
                shard.arrays["items/logp_reference"].tolist(),
                strict=True,
            )
        )
        params = trainable_parameters(model)
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        total_loss = 0.0
        with exact_attention():
            for start in range(0, len(pair_ids), chunk):
                ids = pair_ids[start : start + chunk]
                n = len(ids)
                batch = self.pairs.batch(ids).to(device)
                logp = sequence_logprobs(model, batch)
                ref = torch.tensor(
                    [reference[2 * p] for p in ids] + [reference[2 * p + 1] for p in ids],
                    dtype=logp.dtype,
                    device=device,
                )
                out = dpo_loss(
                    logp[:n],
                    logp[n:],
                    ref[:n],
                    ref[n:],
                    torch.tensor(ids),
                    self.beta,
                    total_pairs=len(pair_ids),
                )
                parts = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
                for name, part in zip(params, parts, strict=True):
                    if part is not None:
                        grads[name] += part
                total_loss += out.loss.item()
        return total_loss, grads

    def items(self, shard: Shard, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Coefficients and ω recomputed from the replayed log-probs, and the scale."""
        sid = shard.arrays["items/sequence_id"]
        reference = shard.arrays["items/logp_reference"]
        by_sid = dict(zip(sid.tolist(), range(len(sid)), strict=True))
        pair_ids = shard.arrays["batch/pair_ids"]
        chosen = np.array([by_sid[2 * p] for p in pair_ids])
        rejected = np.array([by_sid[2 * p + 1] for p in pair_ids])
        h = self.beta * (
            (logp[chosen] - reference[chosen]) - (logp[rejected] - reference[rejected])
        )
        omega_pair = 1.0 / (1.0 + np.exp(h))
        omega = np.empty(len(sid))
        omega[chosen], omega[rejected] = omega_pair, omega_pair
        scale = self.beta / len(pair_ids)
        return scale * shard.arrays["items/sign"] * omega, omega, scale


REPLAYS = {"dpo": DPOReplay}


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
    loss = manifest["run"]["loss"]
    if loss not in REPLAYS:
        raise ValueError(
            f"{run_dir}/run.json: no replay for loss {loss!r}; supported: {', '.join(REPLAYS)}"
        )
    model_name = manifest["run"]["model"]
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, dtype, device)
    replay = REPLAYS[loss](manifest, tokenizer)
    targets = load_targets(run_dir)
    shards = list_shards(run_dir / "shards")
    if not shards:
        raise FileNotFoundError(f"{run_dir}/shards: no shards; the run captured nothing")

    records = []
    for index, path in enumerate(shards):
        shard = read_shard(path)
        records.append(
            _replay_checkpoint(
                run_dir, model, tokenizer, replay, shard, targets, chunk_size, device
            )
        )
        if on_checkpoint is not None:
            on_checkpoint(index + 1, len(shards))
    result = {
        "schema_version": SCHEMA_VERSION,
        "loss": loss,
        "weight_name": manifest["run"].get("weight_name", "weight"),
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


def _replay_checkpoint(
    run_dir: Path, model, tokenizer, replay, shard: Shard, targets, chunk: int, device
) -> dict:
    load_parameters(model, run_dir / shard.attrs["checkpoint"])
    direction = target_gradient(model, targets.sequences, tokenizer.pad_token_id, chunk)
    logp, delta = replay.deltas(model, shard, direction, chunk, device)
    coefficient, weight, scale = replay.items(shard, logp)
    unit_id = shard.arrays["items/unit_id"]
    group = regroup(torch.from_numpy(weight), torch.from_numpy(unit_id)).numpy()
    items = ItemAlignment(
        coefficient, weight, shard.arrays["items/sign"], group, unit_id, delta, scale
    )
    parts = alignment_parts(items)
    _, loss_grad = replay.loss_gradient(model, shard, chunk, device)
    whole = dot(loss_grad, direction)
    lr = float(shard.attrs["learning_rate"])
    update_path = run_dir / shard.attrs["update"] if shard.attrs.get("update") else None
    update_alignment = None
    if update_path is not None and update_path.exists() and lr > 0:
        update = load_file(str(update_path))
        update_alignment = -dot({n: update[n] for n in direction}, direction) / lr
    loss_norm, target_norm = dot(loss_grad, loss_grad) ** 0.5, dot(direction, direction) ** 0.5

    write_shard(
        run_dir / ALIGNMENT_DIR / f"step_{shard.step:08d}.h5",
        ShardRecord(
            step=shard.step,
            attrs={"whole": whole},
            arrays={
                "sequence_id": shard.arrays["items/sequence_id"],
                "delta": delta,
                "coefficient": coefficient,
                "weight": weight,
                "sign": items.sign,
                "group": group,
                "logp_replay": logp,
                "logp_captured": shard.arrays["items/logp"],
            },
        ),
    )
    return {
        "step": shard.step,
        "learning_rate": lr,
        "steps_since_previous": int(shard.attrs["steps_since_previous"]),
        "alignment": {"whole": whole, **parts},
        "check": {
            "parts_error": abs(whole - parts["whole_from_parts"]),
            "tolerance": 1e-6 * float(np.abs(coefficient * delta).sum()),
            "max_logp_drift": float(np.abs(logp - shard.arrays["items/logp"]).max()),
        },
        "extras": {
            "loss_grad_norm": loss_norm,
            "target_grad_norm": target_norm,
            "cosine": whole / (loss_norm * target_norm) if loss_norm * target_norm else 0.0,
            "update_alignment": update_alignment,
        },
        "weights": {
            name: weight[(group == i) & (items.sign > 0)].tolist()
            for i, name in enumerate(GROUP_NAMES)
        },
    }
