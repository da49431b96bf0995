"""End to end on a tiny run: train, targets, replay; G checked against brute force.

The whole G comes from autograd of the actual DPO loss, the parts from per-item δ; both
are compared with brute-force dot products of full float64 gradients, one pair at a time,
within 1e-6 · Σ|w_i δ_i| (METHOD.md: relative tolerances mean nothing near G = 0).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from graddyn.checkpoints import load_parameters
from graddyn.data.batches import PairTokenizer
from graddyn.data.pairs import load_pairs
from graddyn.models import load_model, load_tokenizer
from graddyn.replay import replay_run
from graddyn.store.shard import list_shards, read_shard
from graddyn.targets import build_targets, load_targets
from graddyn.train.dpo import DPOConfig, train_dpo
from tests.bruteforce import flat_grad, single_logp, target_gradient


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    config = DPOConfig(
        model=tiny_model_dir,
        steps=3,
        batch_size=4,
        grad_accumulation=2,
        max_prompt_tokens=24,
        max_response_tokens=10,
        capture_every=2,
        learning_rate=1e-3,
    )
    train_dpo(config, run_dir)
    build_targets(run_dir, n_prompts=3, max_new_tokens=6)
    replay_run(run_dir, dtype="float64")
    return run_dir, config


def test_run_layout(tiny_run):
    run_dir, _ = tiny_run
    steps = [read_shard(p).step for p in list_shards(run_dir / "shards")]
    assert steps == [0, 2]
    assert (run_dir / "checkpoints" / "final.safetensors").exists()
    assert len(load_targets(run_dir)) == 3


def test_parts_add_up_and_match_brute_force(tiny_run):
    run_dir, config = tiny_run
    result = json.loads((run_dir / "alignment" / "alignment.json").read_text())
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, "float64")
    params = [p for p in model.parameters() if p.requires_grad]
    targets = load_targets(run_dir)
    pairs = PairTokenizer(
        tokenizer, load_pairs().pairs, config.max_prompt_tokens, config.max_response_tokens
    )
    for record in result["checkpoints"]:
        shard = read_shard(run_dir / "shards" / f"step_{record['step']:08d}.h5")
        load_parameters(model, run_dir / shard.attrs["checkpoint"])
        g_target = target_gradient(model, targets.sequences, params)
        reference = dict(
            zip(
                shard.arrays["items/sequence_id"].tolist(),
                shard.arrays["items/logp_reference"].tolist(),
                strict=True,
            )
        )
        pair_ids = shard.arrays["batch/pair_ids"].tolist()
        n = len(pair_ids)
        positive = torch.zeros_like(g_target)
        negative = torch.zeros_like(g_target)
        whole = torch.zeros_like(g_target)
        for pid in pair_ids:
            chosen = single_logp(model, pairs[pid].chosen)
            rejected = single_logp(model, pairs[pid].rejected)
            h = config.beta * ((chosen - reference[2 * pid]) - (rejected - reference[2 * pid + 1]))
            omega = torch.sigmoid(-h).detach()
            positive += flat_grad(config.beta / n * omega * -chosen, params, retain=True)
            negative += flat_grad(config.beta / n * omega * rejected, params, retain=True)
            whole += flat_grad(-torch.nn.functional.logsigmoid(h) / n, params)
        alignment = record["alignment"]
        tolerance = record["check"]["tolerance"]
        assert tolerance > 0
        assert abs(alignment["whole"] - float(whole @ g_target)) <= tolerance
        assert abs(alignment["positive"] - float(positive @ g_target)) <= tolerance
        assert abs(alignment["negative"] - float(negative @ g_target)) <= tolerance
        assert record["check"]["parts_error"] <= tolerance
        groups = alignment["groups"]
        assert abs(sum(g["whole"] for g in groups.values()) - alignment["whole"]) <= tolerance
        for group in groups.values():
            assert abs(group["positive"] + group["negative"] - group["whole"]) <= tolerance


def test_per_item_deltas_stored(tiny_run):
    run_dir, _ = tiny_run
    record = read_shard(run_dir / "alignment" / "step_00000000.h5")
    assert record.arrays["delta"].shape == record.arrays["coefficient"].shape
    assert np.abs(record.arrays["logp_replay"] - record.arrays["logp_captured"]).max() < 1e-4


def test_surrogate_whole_for_an_unknown_loss(tiny_run, tmp_path):
    """A run of a loss graddyn does not know replays through the items' surrogate."""
    from graddyn.replay.run import replay_checkpoint

    run_dir, config = tiny_run
    model = load_model(config.model, "float64")
    targets = load_targets(run_dir)
    shard = read_shard(run_dir / "shards" / "step_00000000.h5")
    known = replay_checkpoint(run_dir, model, shard, targets, 4, "cpu")
    shard.attrs["loss"] = "my-loss"
    unknown = replay_checkpoint(run_dir, model, shard, targets, 4, "cpu")
    assert known["check"]["whole_source"] == "dpo loss"
    assert unknown["check"]["whole_source"] == "items surrogate"
    tolerance = known["check"]["tolerance"]
    assert abs(unknown["alignment"]["whole"] - known["alignment"]["whole"]) <= tolerance
    assert unknown["check"]["parts_error"] <= tolerance
