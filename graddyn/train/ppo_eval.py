"""Evaluation of a PPO run without a hosted judge (METHOD.md section 6).

The held-out reward of greedy responses before and after training, each with a bootstrap
confidence interval, beside the reward model's own held-out pair accuracy: a reward that
PPO optimises is a weak judge of PPO, and the reader must see how weak.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from graddyn.checkpoints import load_parameters
from graddyn.data.collate import collate_sequences
from graddyn.data.pairs import PreferencePair, load_pairs, split_pairs
from graddyn.models import load_model, load_tokenizer
from graddyn.reward import load_reward_model, resolve_reward_model_path
from graddyn.store.manifest import read_manifest
from graddyn.targets import choose_prompts
from graddyn.train.ppo import PPOConfig, sample_responses


@torch.no_grad()
def held_out_reward(
    policy, reward, tokenizer, prompts: list[PreferencePair], config: PPOConfig, seed: int = 0
) -> dict:
    """Mean reward-model score of greedy responses to held-out prompts, with a bootstrap
    95% confidence interval of the mean (percentile method, fixed seed)."""
    scores = []
    for start in range(0, len(prompts), 16):
        sequences = sample_responses(
            policy, tokenizer, prompts[start : start + 16], config, greedy=True
        )
        batch = collate_sequences(sequences, tokenizer.pad_token_id).to(config.device)
        scores.append(reward.score(batch).float().cpu())
    values = torch.cat(scores).numpy()
    interval = stats.bootstrap(
        (values,),
        np.mean,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return {
        "mean": float(values.mean()),
        "ci95": [float(interval.low), float(interval.high)],
        "n": int(values.size),
    }


def evaluate_ppo_run(run_dir: str | Path, n_prompts: int = 64, seed: int = 0) -> dict:
    """Held-out reward of the initial and final policies beside the reward model's own
    held-out accuracy; written to `run_dir/ppo_eval.json`."""
    run_dir = Path(run_dir)
    run = read_manifest(run_dir)["run"]
    config = PPOConfig(
        **{k: run[k] for k in PPOConfig.__dataclass_fields__ if k in run and k != "projection"}
    )
    _, held_out = split_pairs(
        load_pairs(config.data).pairs, config.held_out_fraction, config.split_seed
    )
    prompts = choose_prompts(held_out, n_prompts, seed)
    tokenizer = load_tokenizer(config.model)
    reward, _ = load_reward_model(config.reward_model, config.dtype, config.device)
    policy = load_model(config.model, config.dtype, config.device)
    before = held_out_reward(policy, reward, tokenizer, prompts, config, seed)
    load_parameters(policy, run_dir / "checkpoints" / "final.safetensors")
    after = held_out_reward(policy, reward, tokenizer, prompts, config, seed)
    report_path = resolve_reward_model_path(config.reward_model) / "build_report.json"
    accuracy = (
        json.loads(report_path.read_text()).get("held_out") if report_path.exists() else None
    )
    result = {
        "reward_before": before,
        "reward_after": after,
        "reward_model_held_out": accuracy,
        "note": "a reward that PPO optimises is a weak judge of PPO",
    }
    (run_dir / "ppo_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
