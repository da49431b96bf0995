"""Capture: hook-projected per-sequence gradients against brute force, and no side effects."""

from __future__ import annotations

import numpy as np
import torch

from graddyn.capture.projection import KroneckerProjector
from graddyn.capture.session import CaptureConfig, CaptureSession
from graddyn.data.collate import collate_sequences
from graddyn.logprobs import sequence_logprobs
from graddyn.losses.dpo import dpo_loss, sequence_id
from graddyn.store.shard import list_shards, read_shard
from tests.bruteforce import named_grads, project_named_grads, single_logp

BETA = 0.1


def _dpo_step(model, sequences, pad_id, session=None, step=0):
    """One DPO step on pairs (chosen, rejected) = (sequences[2i], sequences[2i+1])."""
    chosen, rejected = sequences[0::2], sequences[1::2]
    n = len(chosen)
    pair_ids = torch.arange(n) + 100
    batch = collate_sequences(chosen + rejected, pad_id)
    reference = torch.linspace(-40.0, -20.0, 2 * n, dtype=torch.float64)
    if session:
        session.start_step(step)
    logp = sequence_logprobs(model, batch)
    out = dpo_loss(logp[:n], logp[n:], reference[:n], reference[n:], pair_ids, BETA)
    rows = torch.cat([sequence_id(pair_ids, 0), sequence_id(pair_ids, 1)])
    if session:
        session.observe(out.items, out.loss, batch, rows)
    out.loss.backward()
    if session:
        session.end_step({"pair_ids": pair_ids}, learning_rate=0.0)
    return out, reference


def test_per_sequence_projection_matches_brute_force(
    tiny_model, tiny_sequences, tokenizer, tmp_path
):
    config = CaptureConfig(every=1, checkpoints=False)
    session = CaptureSession(tiny_model, tmp_path, config, total_steps=1)
    out, reference = _dpo_step(tiny_model, tiny_sequences, tokenizer.eos_token_id, session)
    session.close()
    shard = read_shard(list_shards(tmp_path / "shards")[0])
    per_sequence = torch.from_numpy(shard.arrays["grads/per_sequence"])
    coefficient = out.items.coefficient
    projector = KroneckerProjector(config.projection)
    n = len(tiny_sequences) // 2
    order = [2 * i for i in range(n)] + [2 * i + 1 for i in range(n)]
    for row, seq_index in enumerate(order):
        tiny_model.zero_grad()
        own_loss = n * coefficient[row] * -single_logp(tiny_model, tiny_sequences[seq_index])
        grads = named_grads(own_loss, tiny_model)
        names = shard.strings["projected_parameters"]
        expected = project_named_grads(projector, names, grads)
        got = per_sequence[row].double()
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    positive = per_sequence[:n].sum(0).numpy() / n
    assert np.allclose(shard.arrays["grads/aggregate/positive"], positive, rtol=1e-6)


def test_capture_does_not_change_gradients(tokenizer, tiny_sequences, tmp_path):
    from tests.conftest import make_tiny_model

    plain = make_tiny_model(len(tokenizer), dtype=torch.float32)
    captured = make_tiny_model(len(tokenizer), dtype=torch.float32)
    _dpo_step(plain, tiny_sequences, tokenizer.eos_token_id)
    session = CaptureSession(captured, tmp_path, CaptureConfig(every=1), total_steps=1)
    _dpo_step(captured, tiny_sequences, tokenizer.eos_token_id, session)
    session.close()
    for (name, a), (_, b) in zip(
        plain.named_parameters(), captured.named_parameters(), strict=True
    ):
        assert torch.equal(a.grad, b.grad), name
