"""Train and evaluate the Bradley-Terry reward model that judges win rates (method, section 6).

The loss of a pair is `-log σ(r(x, y+) - r(x, y-))`, averaged over the batch; chosen and
rejected responses share one forward pass (rows: chosen, then rejected). The reward model
sees only the training split, the same split as every other stage (`split_pairs` with the
same fraction and seed), so its held-out accuracy is measured on prompts nothing saw.

`graddyn build-reward-model` runs `build_default_reward_model`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import bootstrap

from graddyn import __version__
from graddyn.data.batches import PairTokenizer, effective_batches
from graddyn.data.pairs import PreferencePair, load_pairs, split_pairs
from graddyn.models import load_tokenizer
from graddyn.reward import RewardModel, save_reward_model
from graddyn.train.schedule import warmup_cosine

logger = logging.getLogger(__name__)


@dataclass
class RewardConfig:
    """Everything that determines a reward model (stored in its build report).

    The defaults are the recipe of the shipped reward model: one epoch over the 2,073
    training pairs of the bundled file, so no pair is seen twice (130 steps of 16 pairs;
    prompts cut to their last 192 tokens and responses to their first 64, as for the
    default model), AdamW at 2e-4 with a 5 % linear warm-up and a cosine decay to zero.
    Cost on 2 CPU cores: a step of 16 pairs (32 rows of up to 256 tokens) takes 2-3 s
    on an idle machine and 6-11 s while another job holds the cores, so training takes
    about 7 minutes idle (up to 20 busy); scoring the 230 held-out pairs takes 10-30 s.
    """

    base_model: str = "default"
    data: str | None = None
    epochs: float = 1.0
    batch_size: int = 16
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    max_prompt_tokens: int = 192
    max_response_tokens: int = 64
    held_out_fraction: float = 0.1
    split_seed: int = 0
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    eval_batch_size: int = 32
    bootstrap_resamples: int = 9999


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of `-log σ(r+ - r-)` over pairs (log-sigmoid form, stable for any margin)."""
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


def load_split(config: RewardConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The (train, held_out) pairs of `config.data`, skipped rows reported as a warning."""
    pair_file = load_pairs(config.data)
    if pair_file.skipped:
        logger.warning(
            "%s: skipped %d rows: %s",
            pair_file.path,
            len(pair_file.skipped),
            pair_file.skipped_by_reason(),
        )
    return split_pairs(pair_file.pairs, config.held_out_fraction, config.split_seed)


def fit_reward_model(
    model: RewardModel,
    pairs: PairTokenizer,
    pair_ids: list[int],
    config: RewardConfig,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> list[dict]:
    """Train `model` in place with the Bradley-Terry loss; returns each step's metrics.

    `on_step(step, total_steps, metrics)` is called after every optimizer step, with the
    batch's `loss`, `accuracy` (share of pairs with r+ > r-) and mean `margin`.
    """
    steps_per_epoch = math.ceil(len(pair_ids) / config.batch_size)
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    batches = effective_batches(pair_ids, config.batch_size, total_steps, config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = warmup_cosine(optimizer, total_steps, config.warmup_fraction)
    history: list[dict] = []
    for step, batch_ids in enumerate(batches):
        n = len(batch_ids)
        rewards = model.score(pairs.batch(batch_ids).to(config.device))
        chosen, rejected = rewards[:n], rewards[n:]
        loss = bradley_terry_loss(chosen, rejected)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()

        margin = (chosen - rejected).detach()
        metrics = {
            "loss": loss.item(),
            "accuracy": (margin > 0).float().mean().item(),
            "margin": margin.mean().item(),
        }
        history.append(metrics)
        if on_step is not None:
            on_step(step, total_steps, metrics)
    return history


def train_reward_model(
    config: RewardConfig, on_step: Callable[[int, int, dict], None] | None = None
) -> tuple[RewardModel, object, dict]:
    """Train a reward model on the training split of `config.data`.

    Returns the model (eval mode), its tokenizer (the base model's) and a report of the
    run: recipe, split sizes, steps, first and last losses, seconds.
    """
    started = time.time()
    torch.manual_seed(config.seed)
    train, held_out = load_split(config)
    tokenizer = load_tokenizer(config.base_model)
    model = RewardModel.from_base(config.base_model, config.dtype, config.device, config.seed)
    pairs = PairTokenizer(tokenizer, train, config.max_prompt_tokens, config.max_response_tokens)

    history = fit_reward_model(model, pairs, [p.pair_id for p in train], config, on_step)
    model.eval()
    tail = history[-20:]
    report = {
        "recipe": asdict(config),
        "graddyn_version": __version__,
        "train_pairs": len(train),
        "held_out_pairs": len(held_out),
        "steps": len(history),
        "first_loss": history[0]["loss"],
        "last_loss": sum(m["loss"] for m in tail) / len(tail),
        "last_train_accuracy": sum(m["accuracy"] for m in tail) / len(tail),
        "train_seconds": round(time.time() - started, 1),
    }
    return model, tokenizer, report


@torch.no_grad()
def score_pairs(
    model: RewardModel, pairs: PairTokenizer, pair_ids: list[int], batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards of `pair_ids`, each (N,) float64 on the CPU."""
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(pair_ids), batch_size):
        ids = pair_ids[start : start + batch_size]
        rewards = model.score(pairs.batch(ids).to(device)).double().cpu()
        chosen.append(rewards[: len(ids)])
        rejected.append(rewards[len(ids) :])
    return torch.cat(chosen), torch.cat(rejected)


def evaluate_reward_model(
    model: RewardModel,
    pairs: list[PreferencePair],
    tokenizer,
    max_prompt_tokens: int = 192,
    max_response_tokens: int = 64,
    batch_size: int = 32,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> dict:
    """Pair accuracy of `model` on `pairs`, with a bootstrap confidence interval.

    Accuracy is the share of pairs with r+ > r- (a tie counts as wrong). Its interval is
    scipy's percentile bootstrap over pairs (`n_resamples` resamples, numpy generator
    seeded with `seed`), chosen over BCa because it stays defined when every pair is
    right or every pair is wrong. The mean margin r+ - r- is reported beside it.

    Raises:
        ValueError: fewer than two pairs (no interval can be formed).
    """
    if len(pairs) < 2:
        raise ValueError(f"evaluating a reward model needs two pairs or more, got {len(pairs)}")
    tokenized = PairTokenizer(tokenizer, pairs, max_prompt_tokens, max_response_tokens)
    was_training = model.training
    model.eval()
    chosen, rejected = score_pairs(model, tokenized, [p.pair_id for p in pairs], batch_size)
    model.train(was_training)

    margin = (chosen - rejected).numpy()
    correct = (margin > 0).astype(np.float64)
    result = bootstrap(
        (correct,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return {
        "pairs": len(pairs),
        "accuracy": float(correct.mean()),
        "accuracy_ci": [float(interval.low), float(interval.high)],
        "confidence": confidence,
        "ci_method": f"percentile bootstrap over pairs, {n_resamples} resamples, seed {seed}",
        "mean_margin": float(margin.mean()),
        "ties": int((margin == 0).sum()),
    }


def build_default_reward_model(
    out_dir: str | Path,
    config: RewardConfig | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Train the reward model from the default SFT model, evaluate it, save it to `out_dir`.

    The held-out evaluation uses the split of `config`, the one every other stage uses.
    Writes `build_report.json` (recipe, held-out accuracy and its interval, seconds)
    beside the model and returns the same report. See `RewardConfig` for the cost.
    """
    config = config or RewardConfig()
    started = time.time()
    model, tokenizer, report = train_reward_model(config, on_step)
    _, held_out = load_split(config)
    report["held_out"] = evaluate_reward_model(
        model,
        held_out,
        tokenizer,
        config.max_prompt_tokens,
        config.max_response_tokens,
        config.eval_batch_size,
        n_resamples=config.bootstrap_resamples,
        seed=config.seed,
    )
    logger.info(
        "reward model: held-out accuracy %.3f (95%% CI %.3f-%.3f) on %d pairs",
        report["held_out"]["accuracy"],
        *report["held_out"]["accuracy_ci"],
        report["held_out"]["pairs"],
    )

    out_dir = Path(out_dir)
    save_reward_model(model, tokenizer, out_dir)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["seconds"] = round(time.time() - started, 1)
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
