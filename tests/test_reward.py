"""The Bradley-Terry reward model: where it reads, its loss, training, evaluation, saving."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2Model

from graddyn import reward
from graddyn.data.batches import PairTokenizer
from graddyn.data.collate import collate_sequences, tokenize_sequence
from graddyn.models import disable_dropout
from graddyn.reward import (
    RewardModel,
    last_real_token,
    load_reward_model,
    save_reward_model,
)
from graddyn.train.reward import (
    RewardConfig,
    bradley_terry_loss,
    build_default_reward_model,
    evaluate_reward_model,
    fit_reward_model,
    score_pairs,
)
from tests.conftest import make_tiny_model

LIMITS = (24, 12)


def tiny_reward_model(tokenizer, dtype=torch.float64, seed: int = 0) -> RewardModel:
    return RewardModel(make_tiny_model(len(tokenizer), dtype, seed).gpt_neox, seed=seed)


def tiny_gpt2_reward_model(tokenizer, seed: int = 0) -> RewardModel:
    """Learned absolute positions: scores depend on `position_ids`, unlike with rotary."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    backbone = GPT2Model(config)
    disable_dropout(backbone)
    return RewardModel(backbone.double().eval(), seed=seed)


ARCHITECTURES = {"gpt_neox": tiny_reward_model, "gpt2": tiny_gpt2_reward_model}


@pytest.fixture(scope="module")
def mixed_sequences(tokenizer, real_pairs):
    """Sequences of different lengths: complete responses and one cut before its EOS."""
    responses = sorted(
        ((p.prompt, r) for p in real_pairs for r in (p.chosen, p.rejected)),
        key=lambda pr: len(tokenizer(pr[1])["input_ids"]),
    )
    sequences = [
        tokenize_sequence(tokenizer, *responses[0], 20, 60),
        tokenize_sequence(tokenizer, *responses[1], 9, 60),
        tokenize_sequence(tokenizer, *responses[20], 16, 5),
        tokenize_sequence(tokenizer, *responses[2], 12, 60, append_eos=False),
    ]
    eos = tokenizer.eos_token_id
    assert sequences[0].response_ids[-1] == eos and sequences[1].response_ids[-1] == eos
    assert sequences[2].response_ids[-1] != eos and sequences[3].response_ids[-1] != eos
    assert len({len(s.prompt_ids) + len(s.response_ids) for s in sequences}) == 4
    return sequences


def test_last_real_token_reads_the_mask():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_real_token(mask).tolist() == [1, 3, 3, 1]
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        last_real_token(torch.tensor([[1, 0], [0, 0]]))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_score_is_the_head_at_the_last_real_token(
    tokenizer, mixed_sequences, padding_side, architecture
):
    model = ARCHITECTURES[architecture](tokenizer)
    batch = collate_sequences(mixed_sequences, tokenizer.pad_token_id, padding_side)
    with torch.no_grad():
        scores = model.score(batch)
    assert scores.shape == (len(mixed_sequences),)

    last = last_real_token(batch.attention_mask)
    for row, seq in enumerate(mixed_sequences):
        ids = seq.prompt_ids + seq.response_ids
        assert batch.input_ids[row, last[row]].item() == ids[-1]
        with torch.no_grad():
            hidden = model.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            expected = model.head(hidden).item()
        assert abs(scores[row].item() - expected) < 1e-5


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_left_and_right_padding_give_the_same_scores(tokenizer, mixed_sequences, architecture):
    model = ARCHITECTURES[architecture](tokenizer)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        right = model.score(collate_sequences(mixed_sequences, pad, "right"))
        left = model.score(collate_sequences(mixed_sequences, pad, "left"))
    assert torch.allclose(left, right, rtol=0, atol=1e-10)


def test_bradley_terry_loss_matches_its_formula():
    generator = torch.Generator().manual_seed(0)
    chosen = 3 * torch.randn(9, generator=generator, dtype=torch.float64)
    rejected = 3 * torch.randn(9, generator=generator, dtype=torch.float64)
    expected = sum(
        -math.log(1 / (1 + math.exp(-(c - r))))
        for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)
    ) / len(chosen)
    assert abs(bradley_terry_loss(chosen, rejected).item() - expected) < 1e-12

    far = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([200.0]))
    assert torch.isfinite(far) and abs(far.item() - 200.0) < 1e-4


def test_a_few_steps_lower_the_training_loss(tokenizer, real_pairs):
    model = tiny_reward_model(tokenizer, torch.float32)
    train = real_pairs[:8]
    pairs = PairTokenizer(tokenizer, train, *LIMITS)
    ids = [p.pair_id for p in train]
    config = RewardConfig(epochs=12, batch_size=8, learning_rate=3e-3, warmup_fraction=0.0)

    def loss() -> float:
        return bradley_terry_loss(*score_pairs(model, pairs, ids)).item()

    before = loss()
    seen = []
    history = fit_reward_model(model, pairs, ids, config, lambda s, n, m: seen.append((s, n)))
    after = loss()
    assert len(history) == 12 and seen[-1] == (11, 12)
    assert abs(history[0]["loss"] - before) < 1e-5
    assert after < before - 0.05


def test_bootstrap_interval_contains_the_accuracy(tokenizer, real_pairs):
    model = tiny_reward_model(tokenizer, torch.float32)
    result = evaluate_reward_model(model, real_pairs[:24], tokenizer, *LIMITS, n_resamples=999)
    low, high = result["accuracy_ci"]
    assert result["pairs"] == 24
    assert 0.0 <= low <= result["accuracy"] <= high <= 1.0
    assert low < high
    assert "percentile" in result["ci_method"]
    assert math.isfinite(result["mean_margin"])
    again = evaluate_reward_model(model, real_pairs[:24], tokenizer, *LIMITS, n_resamples=999)
    assert again == result

    with pytest.raises(ValueError, match="two pairs"):
        evaluate_reward_model(model, real_pairs[:1], tokenizer, *LIMITS)


def test_save_and_load_give_identical_scores(tmp_path, tokenizer, tiny_sequences):
    model = tiny_reward_model(tokenizer, torch.float32, seed=3)
    model.base_model = "tiny"
    save_reward_model(model, tokenizer, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "reward_config.json").read_text())
    assert config["head_shape"] == [1, 32] and config["base_model"] == "tiny"
    assert not list((tmp_path / "rm").glob("*.bin")) and not list((tmp_path / "rm").glob("*.pt"))

    loaded, loaded_tokenizer = load_reward_model(tmp_path / "rm")
    batch = collate_sequences(tiny_sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(loaded.score(batch), model.score(batch))
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert not loaded.training and loaded.base_model == "tiny"


def test_build_trains_evaluates_and_saves(tmp_path, tiny_model_dir, tokenizer, tiny_sequences):
    config = RewardConfig(
        base_model=tiny_model_dir,
        epochs=2 * 4 / 2073,
        batch_size=4,
        max_prompt_tokens=LIMITS[0],
        max_response_tokens=LIMITS[1],
        bootstrap_resamples=999,
    )
    report = build_default_reward_model(tmp_path / "rm", config)
    assert report["steps"] == 2 and report["train_pairs"] == 2073
    assert report["held_out"]["pairs"] == report["held_out_pairs"] == 230
    assert report["recipe"]["base_model"] == tiny_model_dir
    saved = json.loads((tmp_path / "rm" / "build_report.json").read_text())
    assert saved["held_out"]["accuracy_ci"] == report["held_out"]["accuracy_ci"]

    model, _ = load_reward_model(tmp_path / "rm")
    batch = collate_sequences(tiny_sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.isfinite(model.score(batch)).all()


def test_missing_default_reward_model_says_how_to_build_it(tmp_path, monkeypatch):
    missing = tmp_path / "default_reward_model"
    monkeypatch.setattr(reward, "default_reward_model_path", lambda: missing)
    with pytest.raises(FileNotFoundError, match="graddyn build-reward-model") as error:
        load_reward_model()
    assert str(missing) in str(error.value)
    with pytest.raises(FileNotFoundError, match="not a graddyn reward model"):
        load_reward_model(tmp_path)
