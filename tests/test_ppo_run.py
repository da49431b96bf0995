"""PPO end to end on tiny models: rollouts, capture as token items, exact replay of G.

The whole G comes from autograd of the actual clipped surrogate (at r = 1), the parts
from per-token δ; both are checked against brute-force float64 dot products of full
gradients, one sequence at a time, within 1e-6 · Σ|w_i δ_i|.
"""

from __future__ import annotations

import json

import pytest
import torch

from graddyn.checkpoints import load_parameters
from graddyn.models import load_model
from graddyn.replay import replay_run
from graddyn.replay.sequences import stored_sequences
from graddyn.reward import RewardModel, save_reward_model
from graddyn.store.reader import RunReader
from graddyn.targets import build_targets, load_targets
from graddyn.train.ppo import PPOConfig, train_ppo
from tests.bruteforce import flat_grad, target_gradient


@pytest.fixture(scope="module")
def ppo_run(tiny_model_dir, tokenizer, tmp_path_factory):
    reward_dir = tmp_path_factory.mktemp("reward")
    save_reward_model(RewardModel.from_base(tiny_model_dir), tokenizer, reward_dir)
    run_dir = tmp_path_factory.mktemp("ppo")
    config = PPOConfig(
        model=tiny_model_dir,
        reward_model=str(reward_dir),
        updates=3,
        rollout_size=4,
        max_prompt_tokens=16,
        max_new_tokens=6,
        epochs=1,
        minibatches=2,
        capture_every=2,
        learning_rate=1e-3,
    )
    train_ppo(config, run_dir)
    build_targets(run_dir, n_prompts=2, max_new_tokens=4)
    replay_run(run_dir, dtype="float64")
    return run_dir, config


def test_ppo_run_layout_and_logs(ppo_run):
    run_dir, _ = ppo_run
    run = RunReader(run_dir)
    assert run.steps == [0, 2]
    log = run.train_log()
    assert len(log) == 3
    for key in (
        "reward/mean",
        "kl/mean",
        "clip_fraction",
        "entropy",
        "value_loss",
        "advantage/std",
        "clip_fraction/top",
    ):
        assert key in log[0], key
    shard = run.shard(0)
    assert shard.attrs["algorithm"] == "ppo"
    assert (shard.arrays["items/token_index"] >= 0).all()
    assert "grads/per_sequence_positive" in shard.arrays


def test_ppo_alignment_matches_brute_force(ppo_run):
    run_dir, config = ppo_run
    result = json.loads((run_dir / "alignment" / "alignment.json").read_text())
    model = load_model(config.model, "float64")
    params = [p for p in model.parameters() if p.requires_grad]
    targets = load_targets(run_dir)
    run = RunReader(run_dir)
    for record in result["checkpoints"]:
        assert record["check"]["whole_source"] == "ppo clipped surrogate"
        shard = run.shard(record["step"])
        load_parameters(model, run_dir / shard.attrs["checkpoint"])
        g_target = target_gradient(model, targets.sequences, params)

        a = shard.arrays
        flat, row_of = stored_sequences(shard)
        n_tokens = len(a["items/sequence_id"])
        parts = {"positive": torch.zeros_like(g_target), "negative": torch.zeros_like(g_target)}
        for sid in a["sequences/sequence_id"].tolist():
            row = row_of[sid]
            start, end = int(flat.offsets[row]), int(flat.offsets[row + 1])
            ids = flat.tokens[start:end]
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            mine = (a["items/sequence_id"] == sid).nonzero()[0]
            for i in mine:
                t = int(a["items/token_index"][i])
                advantage = float(a["items/advantage"][i])
                term = -advantage * logp[t - 1, ids[t]] / n_tokens
                name = "positive" if advantage > 0 else "negative"
                parts[name] += flat_grad(term, params, retain=True)
        tolerance = record["check"]["tolerance"]
        alignment = record["alignment"]
        whole = float((parts["positive"] + parts["negative"]) @ g_target)
        assert abs(alignment["whole"] - whole) <= tolerance
        assert abs(alignment["positive"] - float(parts["positive"] @ g_target)) <= tolerance
        assert abs(alignment["negative"] - float(parts["negative"] @ g_target)) <= tolerance
        assert record["check"]["parts_error"] <= tolerance
