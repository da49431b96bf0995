"""Trainer integrations: TRL DPOTrainer and HF Trainer capture without changing training.

Each run is made twice from the same seed, with and without capture: the final
parameters must be bitwise identical, and what graddyn recorded must equal graddyn's
own computation on the stored batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from graddyn.capture.session import CaptureConfig
from graddyn.checkpoints import load_parameters
from graddyn.logprobs import sequence_logprobs
from graddyn.losses.dpo import dpo_loss
from graddyn.replay.sequences import pad_id_of, stored_sequences
from graddyn.store.reader import RunReader

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _pairs_dataset(real_pairs, n=8):
    return datasets.Dataset.from_list(
        [
            {"prompt": p.prompt[-120:], "chosen": p.chosen[:80], "rejected": p.rejected[:80]}
            for p in real_pairs[:n]
        ]
    )


def _dpo_trainer(cls, model_dir, dataset, out, checkpointing=False, **extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = trl.DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-3,
        beta=0.1,
        max_length=128,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        gradient_checkpointing=checkpointing,
        bf16=False,
    )
    return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **extra)


def test_trl_dpo_capture_is_exact_and_changes_nothing(tiny_model_dir, real_pairs, tmp_path):
    from graddyn.integrations.trl import GraddynDPOTrainer

    dataset = _pairs_dataset(real_pairs)
    plain = _dpo_trainer(trl.DPOTrainer, tiny_model_dir, dataset, tmp_path / "plain")
    plain.train()
    run_dir = tmp_path / "run"
    captured = _dpo_trainer(
        GraddynDPOTrainer,
        tiny_model_dir,
        dataset,
        tmp_path / "cap",
        graddyn_run_dir=run_dir,
        graddyn_config=CaptureConfig(every=2),
    )
    captured.train()
    for (name, a), (_, b) in zip(
        plain.model.named_parameters(), captured.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name

    run = RunReader(run_dir)
    assert run.steps == [0, 2]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for shard in run.shards():
        load_parameters(model, run_dir / shard.attrs["checkpoint"])
        flat, row_of = stored_sequences(shard)
        a = shard.arrays
        rows = [row_of[s] for s in a["items/sequence_id"].tolist()]
        with torch.no_grad():
            ours = sequence_logprobs(model, flat.batch(rows, pad_id_of(model))).double()
        np.testing.assert_allclose(a["items/logp"], ours.numpy(), rtol=1e-5, atol=1e-5)
        pair_ids = a["batch/pair_ids"]
        assert len(pair_ids) == 4  # 2 pairs per device x 2 accumulation steps
        index = {sid: i for i, sid in enumerate(a["items/sequence_id"].tolist())}
        chosen = [index[2 * p] for p in pair_ids.tolist()]
        rejected = [index[2 * p + 1] for p in pair_ids.tolist()]
        ref = torch.from_numpy(a["items/logp_reference"])
        out = dpo_loss(
            ours[chosen],
            ours[rejected],
            ref[chosen],
            ref[rejected],
            torch.from_numpy(pair_ids),
            0.1,
        )
        np.testing.assert_allclose(a["items/weight"][chosen], out.omega.numpy(), rtol=1e-5)
        np.testing.assert_allclose(a["items/weight"][rejected], out.omega.numpy(), rtol=1e-5)
        np.testing.assert_allclose(shard.attrs["metrics"]["loss"], out.loss.item(), rtol=1e-5)
        assert shard.attrs["grad_clipping"]["clipped"] is True
        assert shard.attrs["mixed_precision"] == "no"
        assert "lm_head.weight" not in shard.strings["projected_parameters"]


def test_trl_refuses_unsupported_settings(tiny_model_dir, real_pairs, tmp_path):
    from graddyn.integrations.trl import GraddynDPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        loss_type=["ipo"],
        report_to="none",
        gradient_checkpointing=False,
        use_cpu=True,
        max_steps=1,
    )
    with pytest.raises(ValueError, match="loss_type"):
        GraddynDPOTrainer(
            model=model,
            args=args,
            train_dataset=_pairs_dataset(real_pairs),
            processing_class=tokenizer,
            graddyn_run_dir=tmp_path / "run",
        )


def test_trl_capture_with_gradient_checkpointing(tiny_model_dir, real_pairs, tmp_path):
    """TRL turns checkpointing on by default: the capture must equal a run without it."""
    from graddyn.integrations.trl import GraddynDPOTrainer

    dataset = _pairs_dataset(real_pairs)
    rows = {}
    for checkpointing in (False, True):
        run_dir = tmp_path / f"run-{checkpointing}"
        trainer = _dpo_trainer(
            GraddynDPOTrainer,
            tiny_model_dir,
            dataset,
            tmp_path / f"out-{checkpointing}",
            checkpointing=checkpointing,
            graddyn_run_dir=run_dir,
            graddyn_config=CaptureConfig(every=1, exact_norms=True),
        )
        trainer.train()
        shard = RunReader(run_dir).shard(0)
        assert shard.attrs["gradient_checkpointing"] is checkpointing
        rows[checkpointing] = (shard.arrays["grads/per_sequence"], shard.arrays["grads/norm"])
    for a, b in zip(rows[False], rows[True], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())
