"""PPO, step by step, and its decomposition into token-level items (METHOD.md section 3).

A PPO update, in the order this module reads:

1. KL to the reference, per response token:  k1 = log π - log π_ref,
   k3 = (ρ - 1) - log ρ with log ρ = log π_ref - log π (never negative), abs = |k1|.
2. Per-token rewards:  r_t = -kl_coef · kl_t,  plus the reward-model score at the last
   response token of each row.
3. GAE over the response tokens:  δ_t = r_t + γ V_{t+1} - V_t,  Â_t = δ_t + γλ Â_{t+1},
   with V = 0 after the last response token;  returns R_t = Â_t + V_t.
4. Whitening of the advantages over the valid tokens of the rollout batch.
5. The clipped surrogate, a token mean over the N valid tokens of the rollout batch:

       L_ppo = -(1/N) Σ_t min( ρ_t Â_t, clip(ρ_t, 1-ε, 1+ε) Â_t ),   ρ_t = π_θ / π_old,

   which has the gradient of

       L~ = (1/N) Σ_t sg(m_t ρ_t |Â_t|) · ( -sign(Â_t) · log π_θ(a_t|s_t) ),

   m_t = 0 when (Â_t > 0 and ρ_t > 1+ε) or (Â_t < 0 and ρ_t < 1-ε), else 1.
   Each valid token is an item: positive learning when Â_t > 0, negative learning when
   Â_t < 0, neither when Â_t = 0; its weight is |Â_t| ρ_t m_t and the scale is 1/N.
6. The value loss, a token mean of the squared error (optionally clipped as in PPO2).

Layout: every per-token tensor is a padded (B, T) tensor aligned like
`graddyn.logprobs.response_token_logprobs`: position t holds the log-prob of token t, and
`mask` is 1 on the response tokens whose log-prob is scored (column 0 never is). Rows may
be left- or right-padded; nothing here assumes either, except `token_index` (see
`ppo_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graddyn.items import Items, assign_groups

KL_ESTIMATORS = ("k1", "k3", "abs")
WHITEN_EPS = 1e-8


def kl_per_token(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T) per-token estimate of KL(π || π_ref) at the sampled tokens.

    Args:
        logp: (B, T) log π of the sampled tokens.
        ref_logp: (B, T) log π_ref of the same tokens.
        estimator: `"k1"` (log π - log π_ref, unbiased, may be negative), `"k3"`
            ((ρ - 1) - log ρ with log ρ = log π_ref - log π, unbiased and never negative)
            or `"abs"` (|log π - log π_ref|).
        mask: optional (B, T) response mask; the result is zero outside it. Without a mask
            the result is zero wherever both log-probs are zero, as they are outside the
            response in `response_token_logprobs`.

    Negative k1 values are kept as they are: the KL that is logged must be the one that
    enters the reward (FIELD_CASES F11).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; use one of {KL_ESTIMATORS}")
    log_ratio = logp - ref_logp
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "abs":
        kl = log_ratio.abs()
    else:
        log_rho = -log_ratio
        kl = torch.expm1(log_rho) - log_rho
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) KL of each row: the sum of the per-token values that entered the reward."""
    return torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum(dim=1)


def last_response_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) column of the last response token of each row (the last position with mask 1).

    This is where the sequence score goes, whether the row is left- or right-padded and
    whether or not the response ends with EOS.
    """
    valid = mask.bool()
    empty = ~valid.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no response token; drop them from the batch")
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(valid)
    return torch.where(valid, columns, torch.full_like(columns, -1)).amax(dim=1)


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """(B, T) per-token rewards: `-kl_coef · kl_t` on response tokens, plus the score.

    Args:
        scores: (B,) reward-model score of each sequence.
        kl: (B, T) per-token KL from `kl_per_token`, the same tensor that is logged.
        mask: (B, T) response mask.
        kl_coef: β of the KL penalty.

    The score is added at the last response token of each row (`last_response_index`);
    padding positions get zero reward.
    """
    valid = mask.bool()
    rewards = torch.where(valid, -kl_coef * kl, torch.zeros_like(kl))
    last = last_response_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens of each row.

        δ_t = r_t + γ V_next - V_t,   Â_t = δ_t + γλ Â_next,   R_t = Â_t + V_t

    where "next" is the next response token of the same row and V_next = Â_next = 0 after
    the last one (the episode ends there). Columns are scanned right to left; padding and
    prompt columns are skipped (they carry the running values through unchanged and get
    zero advantage), so left-padded and right-padded rows give the same advantages.

    Args:
        rewards: (B, T) per-token rewards (`token_rewards`).
        values: (B, T) value estimates V_t of the response tokens.
        mask: (B, T) response mask.
        gamma: discount γ.
        lam: GAE λ.

    Returns:
        (advantages, returns), both (B, T), detached, zero outside the mask.
    """
    rewards, values = rewards.detach(), values.detach()
    valid = mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        here = valid[:, t]
        advantages[:, t] = torch.where(here, advantage, torch.zeros_like(advantage))
        next_value = torch.where(here, values[:, t], next_value)
        next_advantage = torch.where(here, advantage, next_advantage)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(B, T) values standardised over the valid tokens of the whole batch.

        out = (x - mean) / std          (+ mean when `shift_mean` is False)

    mean and std are taken over the positions where `mask` is 1, so padding never affects
    them. std is the biased (population) standard deviation, dividing by the number of
    valid tokens: it is defined for a single valid token, and the batch's valid tokens are
    the whole population being standardised. When std <= `WHITEN_EPS` (a single valid
    token, or all values equal) the values are only centred, never divided by a number
    close to zero, which would turn rounding noise into large advantages. The result is
    zero outside the mask.
    """
    valid = mask.bool()
    picked = values[valid]
    if picked.numel() == 0:
        raise ValueError("whiten needs at least one valid token; the mask is all zero")
    mean = picked.mean()
    std = (picked - mean).pow(2).mean().sqrt()
    scale = torch.where(std > WHITEN_EPS, std, torch.ones_like(std))
    whitened = (values - mean) / scale
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, torch.zeros_like(whitened))


@dataclass
class PPOOutput:
    """The clipped-surrogate loss of a (micro-)batch, its items and its diagnostics.

    Attributes:
        loss: scalar L_ppo of this (micro-)batch, already divided by the batch's N.
        items: one token-level item per valid token (see `ppo_loss`).
        ratio: (B, T) detached ρ_t = π_θ / π_old, zero outside the mask.
        clip_mask: (B, T) m_t: 1 where the token's gradient passes, 0 where the surrogate
            is clipped, and 0 outside the mask.
        clip_fraction: share of this call's valid tokens with m_t = 0.
        approx_kl: mean over this call's valid tokens of log π_old - log π_θ.
    """

    loss: torch.Tensor
    items: Items
    ratio: torch.Tensor
    clip_mask: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    sequence_ids: torch.Tensor,
    total_tokens: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> PPOOutput:
    """PPO clipped surrogate of a (micro-)batch as a token mean, and its token items.

        L = -(1/N) Σ_t min( ρ_t Â_t, clip(ρ_t, 1-ε, 1+ε) Â_t )

    Args:
        logp: (B, T) log π_θ of the tokens, with gradient.
        old_logp: (B, T) log π_old of the same tokens, from the rollout.
        advantages: (B, T) Â_t (usually whitened), from the rollout.
        mask: (B, T) response mask.
        clip_eps: ε.
        sequence_ids: (B,) dataset id of each row.
        total_tokens: N, the number of valid tokens of the whole rollout (mini-)batch. A
            micro-batch of an accumulated step passes the whole batch's count, so that the
            micro-batch losses (and gradients) add up to the full-batch token mean
            (FIELD_CASES F08). Defaults to `mask.sum()`.
        attention_mask: optional (B, T) mask of real tokens (prompt and response). With it,
            `token_index` is the token's position among its row's real tokens, whatever
            the padding; without it, rows are taken as right-padded (or unpadded) and
            `token_index` is the column index.

    The loss is computed from the flat vector of the valid tokens' log-probs that becomes
    `items.logp`, so `∂loss/∂items.logp` is exactly `-items.coefficient`. Items: `sign`
    is sign(Â), `weight` is |Â| ρ m (detached), `scale` and `normalizer` are 1/N and N,
    `group` ranks |Â| over this call's tokens (ties by sequence id, then token index).
    """
    valid = mask.bool()
    n_valid = int(valid.sum())
    total = n_valid if total_tokens is None else int(total_tokens)
    if total <= 0:
        raise ValueError("ppo_loss needs at least one valid token; the mask is all zero")
    if total < n_valid:
        raise ValueError(
            f"total_tokens={total} is less than the {n_valid} valid tokens of this batch; "
            "pass the valid-token count of the whole rollout batch"
        )

    flat = logp[valid]
    old = old_logp.detach()[valid].to(flat.dtype)
    advantage = advantages.detach()[valid].to(flat.dtype)
    ratio = torch.exp(flat - old)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantage
    loss = -torch.minimum(unclipped, clipped).sum() / total

    ratio = ratio.detach()
    cut = ((advantage > 0) & (ratio > 1 + clip_eps)) | ((advantage < 0) & (ratio < 1 - clip_eps))
    m = (~cut).to(flat.dtype)
    items = _token_items(flat, advantage, ratio * m, valid, sequence_ids, total, attention_mask)

    return PPOOutput(
        loss=loss,
        items=items,
        ratio=_scatter(ratio, valid),
        clip_mask=_scatter(m, valid),
        clip_fraction=cut.to(flat.dtype).mean() if n_valid else flat.new_zeros(()),
        approx_kl=(old - flat.detach()).mean() if n_valid else flat.new_zeros(()),
    )


def _token_items(
    flat: torch.Tensor,
    advantage: torch.Tensor,
    gate: torch.Tensor,
    valid: torch.Tensor,
    sequence_ids: torch.Tensor,
    total: int,
    attention_mask: torch.Tensor | None,
) -> Items:
    """Items of the valid tokens: weight |Â| ρ m, sign sign(Â), scale 1/N."""
    rows, columns = valid.nonzero(as_tuple=True)
    if attention_mask is None:
        token_index = columns
    else:
        real = attention_mask.bool()
        if (valid & ~real).any():
            raise ValueError("mask marks tokens that attention_mask marks as padding")
        token_index = (real.long().cumsum(dim=1) - 1)[rows, columns]
    sequence_id = sequence_ids.to(rows.device).long()[rows]
    magnitude = advantage.abs()
    group = assign_groups(magnitude.cpu(), _token_rank(sequence_id, token_index).cpu())
    return Items(
        logp=flat,
        weight=magnitude * gate,
        sign=torch.sign(advantage).to(torch.int8),
        group=group.to(flat.device),
        sequence_id=sequence_id,
        token_index=token_index.long(),
        scale=1.0 / total,
        unit_id=None,
        normalizer=total,
    )


def _token_rank(sequence_id: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Rank of each token by (sequence id, token index): the tie-break for groups."""
    order = torch.argsort(token_index, stable=True)
    order = order[torch.argsort(sequence_id[order], stable=True)]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device)
    return rank


def _scatter(flat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T) tensor holding `flat` at the valid positions and zero elsewhere."""
    out = flat.new_zeros(valid.shape)
    out[valid] = flat
    return out


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    old_values: torch.Tensor | None = None,
    clip_range: float | None = None,
    total_tokens: int | None = None,
) -> torch.Tensor:
    """Value loss, a token mean of half the squared error over the valid tokens.

        L_V = (1/N) Σ_t ½ (V_t - R_t)²

    or, clipped as in PPO2 when `old_values` and `clip_range` are given,

        L_V = (1/N) Σ_t ½ max( (V_t - R_t)², (V_old + clip(V_t - V_old, -c, c) - R_t)² ).

    N is `total_tokens` (default `mask.sum()`), as in `ppo_loss`. The value loss is not
    part of the alignment G (METHOD.md section 3).
    """
    if (old_values is None) != (clip_range is None):
        raise ValueError("pass both old_values and clip_range to clip the value loss")
    valid = mask.bool()
    total = int(valid.sum()) if total_tokens is None else int(total_tokens)
    if total <= 0:
        raise ValueError("value_loss needs at least one valid token; the mask is all zero")

    returns = returns.detach()
    error = (values - returns).pow(2)
    if old_values is not None:
        old_values = old_values.detach()
        moved = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        error = torch.maximum(error, (moved - returns).pow(2))
    return 0.5 * torch.where(valid, error, torch.zeros_like(error)).sum() / total
