"""G of the whole loss by reverse-mode autograd, independently of the per-item δ.

Where graddyn knows the loss, the actual loss is recomputed from the stored sequences:
DPO's `-log σ(h)` with the stored reference log-probs, PPO's clipped surrogate at the
parameters that generated the rollout (r = 1) with the stored advantages; otherwise the
items' surrogate `Σ_i coefficient_i · (-log π_i)` is differentiated, which checks the
forward-mode δ against a reverse-mode pass but not the items against the loss.
"""

from __future__ import annotations

import numpy as np
import torch

from graddyn.capture.exact import exact_attention, trainable_parameters
from graddyn.data.collate import FlatSequences
from graddyn.logprobs import response_token_logprobs
from graddyn.losses.dpo import CHOSEN, REJECTED, dpo_loss, sequence_id
from graddyn.losses.ppo import ppo_loss
from graddyn.replay.sequences import pad_id_of, stored_sequences
from graddyn.store.shard import Shard


def whole_loss_gradient(model, shard: Shard, chunk: int, device) -> tuple[str, dict]:
    """(which loss was differentiated, ∇θ of it over the shard's effective batch)."""
    flat, row_of = stored_sequences(shard)
    params = trainable_parameters(model)
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    if shard.attrs.get("loss") == "dpo":
        source, losses = "dpo loss", _dpo_losses(model, shard, flat, row_of, chunk, device)
    elif shard.attrs.get("loss") == "ppo":
        source = "ppo clipped surrogate"
        losses = _ppo_losses(model, shard, flat, row_of, chunk, device)
    else:
        source, losses = (
            "items surrogate",
            _surrogate_losses(model, shard, flat, row_of, chunk, device),
        )
    pad = pad_id_of(model)
    with exact_attention():
        for loss in losses(pad):
            parts = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, part in zip(params, parts, strict=True):
                if part is not None:
                    grads[name] += part
    return source, grads


def _dpo_losses(model, shard: Shard, flat: FlatSequences, row_of: dict, chunk: int, device):
    """Chunks of the actual DPO loss, `-log σ(h)` summed over pairs / N."""
    a = shard.arrays
    reference = dict(
        zip(a["items/sequence_id"].tolist(), a["items/logp_reference"].tolist(), strict=True)
    )
    pair_ids = a["batch/pair_ids"].tolist()
    beta = float(shard.attrs["beta"])

    def losses(pad: int):
        for start in range(0, len(pair_ids), chunk):
            ids = torch.tensor(pair_ids[start : start + chunk])
            sids = torch.cat([sequence_id(ids, CHOSEN), sequence_id(ids, REJECTED)]).tolist()
            batch = flat.batch([row_of[s] for s in sids], pad).to(device)
            logp = response_token_logprobs(model, batch).sum(dim=1)
            ref = torch.tensor([reference[s] for s in sids], dtype=logp.dtype, device=device)
            n = len(ids)
            yield dpo_loss(
                logp[:n], logp[n:], ref[:n], ref[n:], ids, beta, total_pairs=len(pair_ids)
            ).loss

    return losses


def _surrogate_losses(model, shard: Shard, flat: FlatSequences, row_of: dict, chunk: int, device):
    """Chunks of `Σ_i coefficient_i · (-log π_i)` over the stored items."""
    a = shard.arrays
    sequence_ids = a["sequences/sequence_id"].tolist()

    def losses(pad: int):
        for start in range(0, len(sequence_ids), chunk):
            sids = sequence_ids[start : start + chunk]
            batch = flat.batch([row_of[s] for s in sids], pad).to(device)
            token_logp = response_token_logprobs(model, batch)
            total = token_logp.new_zeros(())
            for row, sid in enumerate(sids):
                real = batch.attention_mask[row].bool()
                values = token_logp[row][real]
                mine = np.flatnonzero(a["items/sequence_id"] == sid)
                for i in mine:
                    token = int(a["items/token_index"][i])
                    logp = values.sum() if token < 0 else values[token]
                    total = total + float(a["items/coefficient"][i]) * -logp
            yield total

    return losses


def _ppo_losses(model, shard: Shard, flat: FlatSequences, row_of: dict, chunk: int, device):
    """Chunks of the actual clipped surrogate at the parameters that generated the
    rollout: old log-probs = current ones, so r = 1; token mean over the whole batch."""
    a = shard.arrays
    sequence_ids = a["sequences/sequence_id"].tolist()
    total_tokens = len(a["items/sequence_id"])
    clip_eps = float(shard.attrs.get("clip_eps", 0.2))
    advantage = {
        (int(s), int(t)): float(v)
        for s, t, v in zip(
            a["items/sequence_id"], a["items/token_index"], a["items/advantage"], strict=True
        )
    }

    def losses(pad: int):
        for start in range(0, len(sequence_ids), chunk):
            sids = sequence_ids[start : start + chunk]
            batch = flat.batch([row_of[s] for s in sids], pad).to(device)
            logp = response_token_logprobs(model, batch)
            advantages = torch.zeros_like(logp)
            for row, sid in enumerate(sids):
                for column in batch.response_mask[row].nonzero().flatten().tolist():
                    advantages[row, column] = advantage[(sid, column)]
            yield ppo_loss(
                logp,
                logp.detach(),
                advantages,
                batch.response_mask,
                clip_eps,
                torch.tensor(sids),
                total_tokens=total_tokens,
                attention_mask=batch.attention_mask,
            ).loss

    return losses
