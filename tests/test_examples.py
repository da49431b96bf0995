"""The examples run, and capture in a plain PyTorch loop and the HF Trainer changes nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from graddyn.capture.session import CaptureConfig
from graddyn.checkpoints import load_parameters
from graddyn.data.collate import tokenize_sequence
from graddyn.integrations.trainer import GraddynTrainer
from graddyn.logprobs import sequence_logprobs
from graddyn.replay.sequences import pad_id_of, stored_sequences
from graddyn.store.reader import RunReader

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name


def test_plain_pytorch_example_capture_changes_nothing(tmp_path):
    example = load_example("plain_pytorch_dpo")
    captured = example.train(tmp_path / "run", steps=3, capture=True)
    plain = example.train(tmp_path / "plain", steps=3, capture=False)
    assert_same_parameters(plain, captured)
    assert RunReader(tmp_path / "run").steps == [0, 2]


def test_custom_statistic_example(tiny_model_dir, tmp_path, capsys):
    from graddyn.replay import replay_run
    from graddyn.targets import build_targets
    from graddyn.train.dpo import DPOConfig, train_dpo

    config = DPOConfig(
        model=tiny_model_dir,
        steps=2,
        batch_size=3,
        capture_every=1,
        max_prompt_tokens=16,
        max_response_tokens=8,
    )
    train_dpo(config, tmp_path)
    build_targets(tmp_path, n_prompts=2, max_new_tokens=4)
    replay_run(tmp_path)
    load_example("custom_statistic").main(str(tmp_path))
    assert "top-10% share" in capsys.readouterr().out


def test_trl_example_runs(tmp_path):
    pytest.importorskip("trl")
    load_example("trl_dpo").main(str(tmp_path / "run"), steps=2, n_pairs=16)
    assert RunReader(tmp_path / "run").steps == [0, 1]


def _sft_trainer(cls, model_dir, tokenizer, pairs, out, **extra):
    torch.manual_seed(0)
    rows = []
    for pair in pairs[:8]:
        seq = tokenize_sequence(tokenizer, pair.prompt, pair.chosen, 24, 12)
        rows.append(
            {
                "input_ids": seq.prompt_ids + seq.response_ids,
                "labels": [-100] * len(seq.prompt_ids) + seq.response_ids,
            }
        )

    def collate(examples):
        width = max(len(e["input_ids"]) for e in examples)
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor(
                [e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples]
            ),
            "attention_mask": torch.tensor(
                [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
            ),
            "labels": torch.tensor(
                [e["labels"] + [-100] * (width - len(e["labels"])) for e in examples]
            ),
        }

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return cls(model=model, args=args, train_dataset=rows, data_collator=collate, **extra)


def test_hf_trainer_capture_is_exact_and_changes_nothing(
    tiny_model_dir, tokenizer, real_pairs, tmp_path
):
    plain = _sft_trainer(Trainer, tiny_model_dir, tokenizer, real_pairs, tmp_path / "p")
    plain.train()
    run_dir = tmp_path / "run"
    captured = _sft_trainer(
        GraddynTrainer,
        tiny_model_dir,
        tokenizer,
        real_pairs,
        tmp_path / "c",
        graddyn_run_dir=run_dir,
        graddyn_config=CaptureConfig(every=2),
    )
    captured.train()
    assert_same_parameters(plain.model, captured.model)

    run = RunReader(run_dir)
    assert run.steps == [0, 2]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for shard in run.shards():
        load_parameters(model, run_dir / shard.attrs["checkpoint"])
        flat, row_of = stored_sequences(shard)
        rows = [row_of[s] for s in shard.arrays["items/sequence_id"].tolist()]
        with torch.no_grad():
            ours = sequence_logprobs(model, flat.batch(rows, pad_id_of(model))).double()
        np.testing.assert_allclose(shard.arrays["items/logp"], ours.numpy(), rtol=1e-5)
        tokens = int(shard.arrays["sequences/response_mask"].sum())
        np.testing.assert_allclose(shard.arrays["items/coefficient"], 1.0 / tokens)
        loss = -(ours.sum().item()) / tokens
        np.testing.assert_allclose(shard.attrs["metrics"]["loss"], loss, rtol=1e-5)
