"""The PPO reference loop, readable top to bottom, built on the public capture API.

One update:

1. rollouts: sample a response to each of `rollout_size` training prompts from the policy;
2. score: reward-model score at the last real token; per-token KL to the reference with
   the configured estimator (k1 by default); reward = score at the last response token
   minus `kl_coef · KL` on every response token (the KL logged is exactly this one);
3. advantages: GAE(γ, λ) with the critic's values, whitened over the valid tokens of the
   rollout batch;
4. capture (on capture steps): the clipped surrogate over the whole rollout batch at the
   parameters that generated it (so r = 1 and nothing is clipped), handed to the capture
   session as token items: positive learning = tokens with Â > 0, negative = Â < 0,
   weight |Â| (METHOD.md section 3). This pass's gradient is discarded;
5. optimisation: `epochs` passes over `minibatches` minibatches: the clipped surrogate
   (token mean over the minibatch) for the policy, the clipped value loss for the critic,
   AdamW for both. The clip fraction per |Â| group is accumulated from these minibatches.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from graddyn.capture.projection import ProjectionSpec
from graddyn.capture.session import CaptureConfig, CaptureSession
from graddyn.checkpoints import save_parameters
from graddyn.data.collate import TokenizedSequence, collate_sequences, tokenize_sequence
from graddyn.data.pairs import PreferencePair, load_pairs, split_pairs
from graddyn.items import GROUP_NAMES, assign_groups
from graddyn.logprobs import gather_token_logprobs, response_token_logprobs
from graddyn.losses.ppo import (
    gae,
    kl_per_token,
    ppo_loss,
    sequence_kl,
    token_rewards,
    value_loss,
    whiten,
)
from graddyn.models import load_model, load_tokenizer
from graddyn.reward import load_reward_model
from graddyn.targets import cut_at_eos

logger = logging.getLogger(__name__)


@dataclass
class PPOConfig:
    """Everything that determines a PPO run (stored in the run manifest)."""

    model: str = "default"
    reward_model: str = "default"
    data: str | None = None
    held_out_fraction: float = 0.1
    split_seed: int = 0
    updates: int = 30
    rollout_size: int = 16
    max_prompt_tokens: int = 128
    max_new_tokens: int = 32
    temperature: float = 1.0
    epochs: int = 2
    minibatches: int = 2
    learning_rate: float = 2e-5
    critic_learning_rate: float = 1e-4
    clip_eps: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    capture_every: int = 5
    projection: ProjectionSpec = field(default_factory=ProjectionSpec)


@dataclass
class Rollout:
    """One rollout batch and everything computed from it before the updates."""

    batch: object
    sequence_ids: torch.Tensor
    old_logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor


@torch.no_grad()
def sample_responses(
    policy, tokenizer, prompts: list[PreferencePair], config: PPOConfig, greedy: bool = False
) -> list[TokenizedSequence]:
    """A sampled (or greedy) response to each prompt, cut after the first EOS."""
    prompt_only = [
        tokenize_sequence(tokenizer, p.prompt, "", config.max_prompt_tokens, 0, append_eos=False)
        for p in prompts
    ]
    batch = collate_sequences(prompt_only, tokenizer.pad_token_id, "left").to(config.device)
    sampling = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": config.temperature, "top_k": 0, "top_p": 1.0}
    )
    output = policy.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    width = batch.input_ids.shape[1]
    sequences = []
    for row, seq in enumerate(prompt_only):
        response = cut_at_eos(output[row, width:].tolist(), tokenizer.eos_token_id)
        sequences.append(TokenizedSequence(seq.prompt_ids, response or [tokenizer.eos_token_id]))
    return sequences


@torch.no_grad()
def make_rollout(
    policy, reference, reward, critic, tokenizer, prompts, first_id: int, config: PPOConfig
) -> Rollout:
    """Steps 1-3: responses, rewards with the KL penalty, GAE and whitened advantages."""
    sequences = sample_responses(policy, tokenizer, prompts, config)
    batch = collate_sequences(sequences, tokenizer.pad_token_id).to(config.device)
    mask = batch.response_mask
    old_logp = response_token_logprobs(policy, batch)
    ref_logp = response_token_logprobs(reference, batch)
    scores = reward.score(batch).float()
    values = critic.token_values(batch).float() * mask
    kl = kl_per_token(old_logp, ref_logp, config.kl_estimator, mask)
    rewards = token_rewards(scores, kl, mask, config.kl_coef)
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    advantages = whiten(advantages, mask)
    ids = torch.arange(first_id, first_id + len(prompts))
    return Rollout(batch, ids, old_logp, values, advantages, returns, scores, kl)


def capture_rollout(
    policy, rollout: Rollout, config: PPOConfig, session: CaptureSession
) -> torch.Tensor:
    """Step 4: the surrogate at r = 1 over the whole rollout batch, observed as items.

    Returns the |Â| group of every valid token, for the clip fractions per group."""
    batch, mask = rollout.batch, rollout.batch.response_mask
    logp = response_token_logprobs(policy, batch)
    out = ppo_loss(
        logp,
        logp.detach(),
        rollout.advantages,
        mask,
        config.clip_eps,
        rollout.sequence_ids,
        attention_mask=batch.attention_mask,
    )
    valid = mask.bool()
    extras = {"advantage": rollout.advantages[valid], "old_logp": rollout.old_logp[valid]}
    session.observe(out.items, out.loss, batch, rollout.sequence_ids, extras)
    out.loss.backward()
    policy.zero_grad(set_to_none=True)
    return out.items.group


def token_groups(rollout: Rollout) -> torch.Tensor:
    """(B, T) |Â| group of every valid token of the rollout (-1 elsewhere)."""
    valid = rollout.batch.response_mask.bool()
    flat = rollout.advantages[valid].abs()
    groups = torch.full(valid.shape, -1, dtype=torch.long)
    groups[valid.cpu()] = assign_groups(flat.cpu(), torch.arange(flat.shape[0])).long()
    return groups


def optimise(
    policy,
    critic,
    optimizer,
    critic_optimizer,
    rollout: Rollout,
    config: PPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """Step 5: epochs x minibatches of clipped-surrogate and value updates."""
    rows = rollout.batch.input_ids.shape[0]
    groups = token_groups(rollout)
    clipped = torch.zeros(3)
    counted = torch.zeros(3)
    logs: dict[str, list[float]] = {
        "clip_fraction": [],
        "entropy": [],
        "value_loss": [],
        "approx_kl": [],
    }
    for _ in range(config.epochs):
        order = torch.randperm(rows, generator=generator)
        for chunk in order.chunk(config.minibatches):
            mb = rollout.batch.select(chunk)
            mask = mb.response_mask
            logits = policy(
                input_ids=mb.input_ids,
                attention_mask=mb.attention_mask,
                position_ids=mb.position_ids,
                use_cache=False,
            ).logits
            logp = gather_token_logprobs(logits, mb)
            out = ppo_loss(
                logp,
                rollout.old_logp[chunk],
                rollout.advantages[chunk],
                mask,
                config.clip_eps,
                rollout.sequence_ids[chunk],
                attention_mask=mb.attention_mask,
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()

            values = critic.token_values(mb).float()
            v_loss = value_loss(
                values,
                rollout.returns[chunk],
                mask,
                old_values=rollout.values[chunk],
                clip_range=config.value_clip,
            )
            critic_optimizer.zero_grad(set_to_none=True)
            v_loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), config.max_grad_norm)
            critic_optimizer.step()

            valid = mask.bool().cpu()
            token_group = groups[chunk][valid]
            was_clipped = (out.clip_mask.cpu()[valid] == 0).float()
            for g in range(3):
                clipped[g] += was_clipped[token_group == g].sum()
                counted[g] += (token_group == g).sum()
            logs["clip_fraction"].append(float(out.clip_fraction))
            logs["approx_kl"].append(float(out.approx_kl))
            logs["value_loss"].append(float(v_loss.detach()))
            logs["entropy"].append(float(_entropy(logits.detach(), mask)))
    metrics = {key: float(np.mean(values)) for key, values in logs.items()}
    for g, name in enumerate(GROUP_NAMES):
        metrics[f"clip_fraction/{name}"] = float(clipped[g] / counted[g].clamp(min=1))
    return metrics


def _entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the policy over the response tokens (read one position earlier)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    valid = mask[:, 1:].bool()
    return entropy[valid].mean()


def train_ppo(
    config: PPOConfig,
    run_dir: str | Path,
    on_update: Callable[[int, dict], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Train with PPO, capturing on schedule into `run_dir`; returns the run directory.

    `run_dir` must be new or empty; `overwrite` replaces an earlier run in it."""
    run_dir = Path(run_dir)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    pair_file = load_pairs(config.data)
    train_pairs, _ = split_pairs(pair_file.pairs, config.held_out_fraction, config.split_seed)
    tokenizer = load_tokenizer(config.model)
    policy = load_model(config.model, config.dtype, config.device)
    reference = copy.deepcopy(policy).requires_grad_(False)
    reward, _ = load_reward_model(config.reward_model, config.dtype, config.device)
    reward.requires_grad_(False)
    critic, _ = load_reward_model(config.reward_model, config.dtype, config.device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=config.critic_learning_rate)
    attrs = {k: v for k, v in asdict(config).items() if k != "projection"}
    attrs.update(
        algorithm="ppo",
        loss="ppo",
        item_kind="token",
        weight_name="abs_advantage",
        data=pair_file.path,
        dropout_disabled=True,
        kl_used="per-token " + config.kl_estimator + " estimator, in the reward",
    )
    capture = CaptureConfig(every=config.capture_every, projection=config.projection)

    with (
        CaptureSession(policy, run_dir, capture, config.updates, attrs, overwrite) as session,
        open(run_dir / "train_log.jsonl", "w") as log,
    ):
        for update in range(config.updates):
            order = torch.randint(len(train_pairs), (config.rollout_size,), generator=generator)
            prompts = [train_pairs[i] for i in order.tolist()]
            rollout = make_rollout(
                policy,
                reference,
                reward,
                critic,
                tokenizer,
                prompts,
                update * config.rollout_size,
                config,
            )
            if session.start_step(update):
                capture_rollout(policy, rollout, config, session)
            metrics = optimise(
                policy, critic, optimizer, critic_optimizer, rollout, config, generator
            )
            metrics.update(_rollout_metrics(rollout))
            session.end_step(
                {"sequence_ids": rollout.sequence_ids}, optimizer.param_groups[0]["lr"], metrics
            )
            log.write(json.dumps({"update": update, **metrics}) + "\n")
            log.flush()
            if on_update is not None:
                on_update(update, metrics)
    save_parameters(policy, run_dir / "checkpoints" / "final.safetensors")
    return run_dir


def _rollout_metrics(rollout: Rollout) -> dict[str, float]:
    mask = rollout.batch.response_mask.bool()
    advantages = rollout.advantages[mask]
    return {
        "reward/mean": float(rollout.scores.mean()),
        "kl/mean": float(sequence_kl(rollout.kl, rollout.batch.response_mask).mean()),
        "advantage/mean": float(advantages.mean()),
        "advantage/std": float(advantages.std(unbiased=False)),
        "advantage/abs_max": float(advantages.abs().max()),
        "response/length": float(mask.sum(1).float().mean()),
    }
