"""DPO and its decomposition into positive learning, negative learning and reweighting.

    L_dpo = -mean log σ(h),
    h = β [ (log π(y+) - log π_ref(y+)) - (log π(y-) - log π_ref(y-)) ]

has the gradient of  β · mean sg(ω) · ( -log π(y+) + log π(y-) ),  ω = σ(-h).
The chosen response of each pair is a positive item and the rejected one a negative item,
both with weight ω and scale β/N, N the number of pairs in the effective batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graddyn.items import WHOLE_SEQUENCE, Items, assign_groups

CHOSEN, REJECTED = 0, 1


def sequence_id(pair_id: torch.Tensor, role: int) -> torch.Tensor:
    """Sequence id of the chosen (`role=0`) or rejected (`role=1`) response of a pair."""
    return pair_id.long() * 2 + role


@dataclass
class DPOOutput:
    """The DPO loss of a batch, its items and the per-pair quantities behind them."""

    loss: torch.Tensor
    items: Items
    h: torch.Tensor
    omega: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    pair_ids: torch.Tensor,
    beta: float,
    total_pairs: int | None = None,
) -> DPOOutput:
    """DPO loss and items of a (micro-)batch of pairs.

    Args:
        policy_chosen: (n,) summed log-probs of the chosen responses, with gradient.
        policy_rejected: (n,) summed log-probs of the rejected responses, with gradient.
        reference_chosen: (n,) reference log-probs of the chosen responses.
        reference_rejected: (n,) reference log-probs of the rejected responses.
        pair_ids: (n,) dataset ids of the pairs.
        beta: DPO temperature.
        total_pairs: N, the number of pairs in the effective batch; a micro-batch of a
            gradient-accumulation step passes the effective batch size so that the loss
            contributions of all micro-batches add up to the mean over the effective
            batch. Defaults to n.

    The loss is computed from `items.logp`, so `∂loss/∂items.logp` is exactly
    `-items.coefficient`. Groups are cut within this call; a capture session cuts them
    again over the effective batch at the end of an accumulated step.
    """
    n = policy_chosen.shape[0]
    total = total_pairs or n
    logp = torch.cat([policy_chosen, policy_rejected])
    policy_chosen, policy_rejected = logp[:n], logp[n:]
    reference_chosen = reference_chosen.detach()
    reference_rejected = reference_rejected.detach()
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    h = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(h).sum() / total
    omega = torch.sigmoid(-h).detach()

    group = assign_groups(omega, pair_ids)
    items = Items(
        logp=logp,
        weight=torch.cat([omega, omega]),
        sign=torch.cat([torch.ones(n, dtype=torch.int8), -torch.ones(n, dtype=torch.int8)]),
        group=torch.cat([group, group]),
        sequence_id=torch.cat([sequence_id(pair_ids, CHOSEN), sequence_id(pair_ids, REJECTED)]),
        token_index=torch.full((2 * n,), WHOLE_SEQUENCE, dtype=torch.long),
        scale=beta / total,
        unit_id=torch.cat([pair_ids, pair_ids]).long(),
        normalizer=total,
    )
    return DPOOutput(
        loss, items, h.detach(), omega, chosen_rewards.detach(), rejected_rewards.detach()
    )


def dpo_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, omega: torch.Tensor
) -> dict[str, float]:
    """Step metrics over the whole effective batch (never summed over micro-batches).

    Rewards already include β; accuracy is the share of pairs whose chosen reward is
    strictly above the rejected one.
    """
    margins = chosen_rewards - rejected_rewards
    return {
        "loss": (-F.logsigmoid(margins)).mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).double().mean().item(),
        "omega/mean": omega.mean().item(),
        "omega/std": omega.std(unbiased=False).item(),
        "omega/min": omega.min().item(),
        "omega/max": omega.max().item(),
    }
