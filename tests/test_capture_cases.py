"""Field cases of per-sample capture: dropout (F13), attention implementations (F14),
bf16 and autocast (F16), memory and chunking (F18), half-precision storage (F22)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from graddyn.capture.session import CaptureConfig, CaptureSession
from graddyn.data.collate import collate_sequences
from graddyn.items import WHOLE_SEQUENCE, Items
from graddyn.logprobs import sequence_logprobs
from graddyn.store.reader import RunReader
from tests.bruteforce import named_grads, single_logp
from tests.test_samplers import tiny_gpt2, tiny_llama

WEIGHTS = (0.5, 1.0, 1.5, 2.0)


def sft_items(logp: torch.Tensor, weight_scale: float = 1.0) -> Items:
    n = logp.shape[0]
    weight = weight_scale * torch.tensor(WEIGHTS[:n], dtype=torch.float64)
    return Items(
        logp=logp,
        weight=weight,
        sign=torch.ones(n, dtype=torch.int8),
        group=torch.zeros(n, dtype=torch.int8),
        sequence_id=torch.arange(n),
        token_index=torch.full((n,), WHOLE_SEQUENCE),
        scale=1.0,
    )


def capture_explicit(model, batch, run_dir, autocast=False, weight_scale=1.0, **config):
    """Explicit per-sequence gradients of Σ_b w_b (-log π_b), through a session."""
    session = CaptureSession(
        model,
        run_dir,
        CaptureConfig(
            every=1, checkpoints=False, explicit_gradients=True, per_sequence=False, **config
        ),
        total_steps=1,
    )
    session.start_step(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp = sequence_logprobs(model, batch)
    items = sft_items(logp, weight_scale)
    loss = items.surrogate_loss()
    session.observe(items, loss, batch, items.sequence_id)
    loss.backward()
    session.end_step({"sample_ids": items.sequence_id}, learning_rate=0.0)
    session.close()
    model.zero_grad(set_to_none=True)
    return RunReader(run_dir).shard(0)


def brute(model, sequences) -> torch.Tensor:
    rows = []
    for w, seq in zip(WEIGHTS, sequences, strict=False):
        grads = named_grads(w * -single_logp(model, seq), model)
        rows.append(torch.cat([g.reshape(-1) for g in grads.values()]))
    return torch.stack(rows)


def test_f13_dropout_masks_repeat_and_match_brute_force(tokenizer, tiny_sequences, tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=len(tokenizer),
        n_positions=128,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    model = GPT2LMHeadModel(config).double().train()
    sequences = tiny_sequences[:4]
    batch = collate_sequences(sequences, tokenizer.eos_token_id)
    shards = []
    for run in ("a", "b"):
        torch.manual_seed(7)
        shards.append(capture_explicit(model, batch, tmp_path / run))
    first, second = (s.arrays["grads/explicit"] for s in shards)
    assert np.array_equal(first, second)
    assert shards[0].attrs["dropout_active"] is True

    names = [n for n, _ in model.named_parameters()]
    for row in range(4):  # brute force with the same masks: same seed, same batch shape
        torch.manual_seed(7)
        logp = sequence_logprobs(model, batch)
        grads = named_grads(WEIGHTS[row] * -logp[row], model)
        expected = torch.cat([grads[n].reshape(-1) for n in names]).numpy()
        np.testing.assert_allclose(
            first[row], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
        )


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_f14_default_attention_with_padding(make, tokenizer, tiny_sequences, tmp_path):
    model = make(len(tokenizer))
    sequences = tiny_sequences[:4]
    batch = collate_sequences(sequences, tokenizer.eos_token_id, "left")
    shard = capture_explicit(model, batch, tmp_path)
    assert shard.attrs["attention_implementation"] == model.config._attn_implementation
    expected = brute(model, sequences).numpy()
    got = shard.arrays["grads/explicit"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2-layernorm", "llama-rmsnorm"])
def test_f16_bf16_and_autocast_close_to_fp32(make, tokenizer, tiny_sequences, tmp_path):
    sequences = tiny_sequences[:4]
    batch = collate_sequences(sequences, tokenizer.eos_token_id)
    reference = make(len(tokenizer)).float()
    fp32 = capture_explicit(reference, batch, tmp_path / "fp32").arrays["grads/explicit"]
    expected = brute(make(len(tokenizer)), sequences).numpy()
    np.testing.assert_allclose(fp32, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())

    cases = {
        "bf16 weights": (make(len(tokenizer)).bfloat16(), False),
        "fp32 weights, bf16 autocast": (make(len(tokenizer)).float(), True),
    }
    for name, (model, autocast) in cases.items():
        shard = capture_explicit(model, batch, tmp_path / name, autocast=autocast)
        got = shard.arrays["grads/explicit"].astype(np.float64)
        assert shard.arrays["grads/explicit"].dtype == np.float32, name
        for row in range(len(sequences)):
            a, b = got[row], expected[row]
            cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            assert cosine >= 0.999, (name, row, cosine)
            assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-2, (name, row)


PEAK_SCRIPT = (
    """
import sys, torch
from tests.conftest import make_tiny_model
from tests.test_capture_cases import capture_explicit
from graddyn.capture.session import CaptureConfig
from graddyn.data.collate import TokenizedSequence, collate_sequences
torch.manual_seed(0)
model = make_tiny_model(300, dtype=torch.float32)
sequences = [TokenizedSequence(torch.randint(1, 300, (8,)).tolist(),
                               torch.randint(1, 300, (504,)).tolist()) for _ in range(32)]
batch = collate_sequences(sequences, 0)
chunk = int(sys.argv[1])
"""
    + """
def norms(run_dir, chunk):
    from graddyn.capture.session import CaptureSession
    from tests.test_capture_cases import sft_items
    from graddyn.logprobs import sequence_logprobs
    session = CaptureSession(model, run_dir, CaptureConfig(every=1, checkpoints=False,
        per_sequence=False, exact_norms=True), total_steps=1)
    session.hooks.collect.chunk_rows = chunk
    session.start_step(0)
    logp = sequence_logprobs(model, batch)
    items = sft_items(logp[:4])
    items = type(items)(logp=logp, weight=torch.ones(32, dtype=torch.float64),
        sign=torch.ones(32, dtype=torch.int8), group=torch.zeros(32, dtype=torch.int8),
        sequence_id=torch.arange(32), token_index=torch.full((32,), -1), scale=1.0)
    loss = items.surrogate_loss()
    session.observe(items, loss, batch, items.sequence_id)
    session.hooks.collect.chunk_rows = chunk
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    loss.backward()
    norm = session.hooks.squared_norms()
    peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print(peak, float(norm.sum()))
import tempfile
norms(tempfile.mkdtemp(), chunk)
"""
)


def test_f18_chunking_bounds_memory_and_changes_nothing(tokenizer, tiny_sequences, tmp_path):
    results = {}
    for chunk in (32, 8, 1):
        completed = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(chunk)],
            capture_output=True,
            text=True,
            check=True,
        )
        peak, total = completed.stdout.split()
        results[chunk] = (int(peak), float(total))
    assert results[1][0] < results[32][0], results
    for chunk in (8, 1):
        assert results[chunk][1] == pytest.approx(results[32][1], rel=1e-6)

    model = tiny_llama(len(tokenizer)).float()
    batch = collate_sequences(tiny_sequences[:4], tokenizer.eos_token_id)
    whole = capture_explicit(model, batch, tmp_path / "whole")
    budget = capture_explicit(model, batch, tmp_path / "budget", memory_budget_mb=0.05)
    np.testing.assert_allclose(
        budget.arrays["grads/explicit"], whole.arrays["grads/explicit"], rtol=1e-6, atol=1e-7
    )


def test_f22_half_storage_never_writes_inf(tokenizer, tiny_sequences, tmp_path, caplog):
    model = tiny_llama(len(tokenizer)).float()
    batch = collate_sequences(tiny_sequences[:4], tokenizer.eos_token_id)
    small = capture_explicit(model, batch, tmp_path / "half", storage_dtype="float16")
    assert small.arrays["grads/explicit"].dtype == np.float16
    assert small.attrs["gradient_storage_dtype"] == "float16"
    big = capture_explicit(
        model, batch, tmp_path / "big", storage_dtype="float16", weight_scale=1e7
    )  # per-sample gradients beyond the fp16 range
    assert big.attrs["gradient_storage_dtype"] == "float32"
    assert np.isfinite(big.arrays["grads/explicit"]).all()
    assert "float16 range" in caplog.text
