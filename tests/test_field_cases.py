"""Regression tests for faults other tools shipped (`../shared/FIELD_CASES.md`), by id.

Every case runs on tiny seeded models built from configs and on the tokenizer trained in
the test session; nothing is downloaded. Brute force means one unpadded sequence at a
time, float64, a plain gather of `log_softmax` and `torch.autograd.grad`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from graddyn.capture.projection import DenseProjector, KroneckerProjector, ProjectionSpec
from graddyn.capture.session import CaptureConfig, CaptureSession
from graddyn.data.batches import PairTokenizer
from graddyn.data.collate import (
    TokenizedSequence,
    collate_sequences,
    flatten_batch,
    tokenize_sequence,
)
from graddyn.data.pairs import load_pairs
from graddyn.logprobs import response_token_logprobs, sequence_logprobs
from graddyn.losses.dpo import dpo_loss, dpo_metrics, sequence_id
from graddyn.models import disable_dropout, load_model, load_tokenizer
from graddyn.store.manifest import read_manifest
from graddyn.store.shard import list_shards, read_shard
from graddyn.train.dpo import DPOConfig, train_dpo
from tests.bruteforce import flat_grad, named_grads, project_named_grads, single_logp
from tests.conftest import make_tiny_model

BETA = 0.1
LN2 = math.log(2.0)


def _as_double(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().double()
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def assert_close(got, expected, rtol: float, label: str = "") -> None:
    """Norm-wise relative check: max |got - expected| <= rtol * max |expected|."""
    got, expected = _as_double(got), _as_double(expected)
    assert got.shape == expected.shape, f"{label}: shape {got.shape} != {expected.shape}"
    scale = expected.abs().max().item()
    error = (got - expected).abs().max().item()
    assert error <= rtol * scale, f"{label}: max error {error:.3g} > {rtol:g} x {scale:.3g}"


def capture_pair_steps(model, run_dir, steps, config):
    """Capture DPO steps; `steps` is a list of lists of (pair_id, chosen, rejected, refs).

    Each inner list is one step's batch (one micro-batch). Returns the shards by step and
    the DPO outputs. No optimizer step is taken, so every step sees the same parameters.
    """
    session = CaptureSession(model, run_dir, config, total_steps=len(steps))
    outputs = []
    for step, pairs in enumerate(steps):
        n = len(pairs)
        pair_ids = torch.tensor([p[0] for p in pairs])
        batch = collate_sequences([p[1] for p in pairs] + [p[2] for p in pairs], 0)
        references = [p[3][0] for p in pairs] + [p[3][1] for p in pairs]
        reference = torch.tensor(references, dtype=torch.float64)
        session.start_step(step)
        logp = sequence_logprobs(model, batch)
        out = dpo_loss(logp[:n], logp[n:], reference[:n], reference[n:], pair_ids, BETA)
        rows = torch.cat([sequence_id(pair_ids, 0), sequence_id(pair_ids, 1)])
        session.observe(out.items, out.loss, batch, rows)
        out.loss.backward()
        session.end_step({"pair_ids": pair_ids}, learning_rate=0.0)
        outputs.append(out)
    session.close()
    shards = [read_shard(path) for path in list_shards(run_dir / "shards")]
    assert [s.step for s in shards] == list(range(len(steps)))
    return shards, outputs


def rows_by_sequence(shard) -> dict[int, np.ndarray]:
    ids = shard.arrays["grads/sequence_id"].tolist()
    return dict(zip(ids, shard.arrays["grads/per_sequence"], strict=True))


# F01: prompt tokens never count in logp, and each component is its own term's gradient.


def test_f01_prompt_not_in_logp(tokenizer, tmp_path):
    model = make_tiny_model(len(tokenizer))
    prompt = [17, 42, 99, 3, 250, 77]
    chosen = TokenizedSequence(prompt, [120, 8, 0])
    rejected = TokenizedSequence(prompt, [64, 301, 12, 55, 0])
    batch = collate_sequences([chosen, rejected], pad_id=0)

    token_logp = response_token_logprobs(model, batch)
    assert (token_logp[0] != 0).sum().item() == 3
    assert (token_logp[1] != 0).sum().item() == 5
    assert (token_logp[:, : len(prompt)] == 0).all()
    logp = sequence_logprobs(model, batch)
    brute = torch.stack([single_logp(model, chosen), single_logp(model, rejected)])
    assert torch.allclose(logp, brute, rtol=1e-12, atol=0)

    reference = torch.tensor([-20.0, -25.0], dtype=torch.float64)
    config = CaptureConfig(every=1, full_aggregates=True, checkpoints=False)
    steps = [[(0, chosen, rejected, reference.tolist())]]
    (shard,), _ = capture_pair_steps(model, tmp_path, steps, config)

    def h() -> torch.Tensor:
        lp_chosen, lp_rejected = single_logp(model, chosen), single_logp(model, rejected)
        return BETA * ((lp_chosen - reference[0]) - (lp_rejected - reference[1]))

    omega = torch.sigmoid(-h()).detach()
    positive = named_grads(BETA * omega * -single_logp(model, chosen), model)
    negative = named_grads(BETA * omega * single_logp(model, rejected), model)
    whole = named_grads(-F.logsigmoid(h()), model)
    with_prompt = named_grads(BETA * omega * -_logp_with_prompt(model, chosen), model)

    captured = {k.removeprefix("grads/full/"): v for k, v in shard.arrays.items()}
    covered = [k.removeprefix("positive/") for k in captured if k.startswith("positive/")]
    linear = _linear_parameter_names(model)
    assert set(linear) <= set(covered), "every Linear parameter is covered"
    assert {f"negative/{name}" for name in covered} <= captured.keys()
    for name in covered:
        got_pos, got_neg = captured[f"positive/{name}"], captured[f"negative/{name}"]
        assert_close(got_pos, positive[name], 1e-6, f"positive {name}")
        assert_close(got_neg, negative[name], 1e-6, f"negative {name}")
        assert_close(
            torch.from_numpy(got_pos).double() + torch.from_numpy(got_neg).double(),
            whole[name],
            1e-6,
            f"sum {name}",
        )
    # Power check: a prompt-inclusive chosen term differs from the captured component.
    diffs = [
        (torch.from_numpy(captured[f"positive/{n}"]).double() - with_prompt[n]).abs().max()
        for n in covered
    ]
    assert max(diffs) > 1e-3 * max(positive[n].abs().max() for n in covered)


def _logp_with_prompt(model, seq: TokenizedSequence) -> torch.Tensor:
    ids = torch.tensor([seq.prompt_ids + seq.response_ids])
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].double(), -1)
    positions = torch.arange(1, ids.shape[1])
    return logp[positions - 1, ids[0, positions]].sum()


def _linear_parameter_names(model) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.append(f"{name}.weight")
            if module.bias is not None:
                names.append(f"{name}.bias")
    return names


# F03: padding side and position ids.


def _tiny_gpt2(vocab_size: int, eos: int, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=vocab_size,
        n_positions=128,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    disable_dropout(model)
    return model.to(dtype).eval()


def _f03_sequences(eos: int) -> list[TokenizedSequence]:
    """Rows of two pairs (chosen A, chosen B, rejected A, rejected B); prompts 6 and 10."""
    generator = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(1, 300, (n,), generator=generator).tolist()

    prompt_a, prompt_b = ids(6), ids(10)
    return [
        TokenizedSequence(prompt_a, ids(3) + [eos]),
        TokenizedSequence(prompt_b, ids(4) + [eos]),
        TokenizedSequence(prompt_a, ids(6) + [eos]),
        TokenizedSequence(prompt_b, ids(2) + [eos]),
    ]


@pytest.mark.parametrize("architecture", ["gpt2", "neox"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_f03_padding_side(tokenizer, architecture, dtype):
    eos = tokenizer.eos_token_id
    if architecture == "gpt2":
        model = _tiny_gpt2(len(tokenizer), eos, dtype)
    else:
        model = make_tiny_model(len(tokenizer), dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    sequences = _f03_sequences(eos)
    assert len(sequences[1].prompt_ids) - len(sequences[0].prompt_ids) == 4

    unpadded_logp, unpadded_grads = [], []
    for seq in sequences:
        value = sequence_logprobs(model, collate_sequences([seq], eos))[0]
        unpadded_logp.append(value)
        unpadded_grads.append(flat_grad(value, params))
    if dtype == torch.float64:
        brute = torch.stack([single_logp(model, seq) for seq in sequences])
        assert torch.allclose(torch.stack(unpadded_logp), brute, rtol=1e-12, atol=0)

    for side in ("left", "right"):
        batch = collate_sequences(sequences, eos, padding_side=side)
        real = batch.attention_mask.bool()
        assert (batch.attention_mask == 0).any(), "the batch must contain padding"
        expected_positions = batch.attention_mask.cumsum(dim=1) - 1
        assert torch.equal(batch.position_ids[real], expected_positions[real])
        logp = sequence_logprobs(model, batch)
        for row in range(len(sequences)):
            label = f"{architecture} {side} row {row}"
            assert_close(logp[row], unpadded_logp[row], 1e-5, f"logp {label}")
            grad = flat_grad(logp[row], params, retain=row < len(sequences) - 1)
            assert_close(grad, unpadded_grads[row], 1e-5, f"grad {label}")


# F04: EOS used as padding never hides a real EOS.


def test_f04_eos_as_pad(tokenizer):
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    prompt = (
        "\n\nHuman: Hi there.\n\nAssistant: Hello!"
        + tokenizer.eos_token
        + "\n\nHuman: How are you?\n\nAssistant:"
    )
    response = " Fine, thanks."
    seq = tokenize_sequence(tokenizer, prompt, response, 64, 32)

    plain = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert eos not in plain
    assert seq.response_ids == plain + [eos], "exactly one EOS is appended"
    assert eos in seq.prompt_ids, "the prompt holds a real EOS"

    longer = TokenizedSequence(seq.prompt_ids, seq.response_ids[:-1] + [11, 12, 13, eos])
    batch = collate_sequences([seq, longer], pad_id=tokenizer.pad_token_id)
    n_real = len(seq.prompt_ids) + len(seq.response_ids)
    assert batch.input_ids.shape[1] == n_real + 3
    assert batch.input_ids[0, n_real - 1 :].tolist() == [eos] * 4
    assert batch.attention_mask[0].tolist() == [1] * n_real + [0] * 3
    prompt_eos = seq.prompt_ids.index(eos)
    assert batch.attention_mask[0, prompt_eos] == 1
    assert batch.response_mask[0].tolist() == (
        [0] * len(seq.prompt_ids) + [1] * len(seq.response_ids) + [0] * 3
    )

    model = make_tiny_model(len(tokenizer))
    token_logp = response_token_logprobs(model, batch)[0]
    assert (token_logp[n_real - 1] != 0).item(), "the response's EOS is scored"
    assert (token_logp[n_real:] == 0).all(), "pads are not scored"
    assert (token_logp != 0).sum().item() == len(seq.response_ids)
    logp = sequence_logprobs(model, batch)[0]
    assert torch.allclose(logp, single_logp(model, seq), rtol=1e-12, atol=0)
    without_eos = TokenizedSequence(seq.prompt_ids, seq.response_ids[:-1])
    assert not torch.allclose(logp, single_logp(model, without_eos), rtol=1e-6, atol=0)

    stored = flatten_batch(batch)
    assert stored.offsets.tolist() == [0, n_real, 2 * n_real + 3]
    rebuilt = stored.batch([0], pad_id=tokenizer.pad_token_id)
    single = collate_sequences([seq], pad_id=tokenizer.pad_token_id)
    for got, expected in zip(rebuilt.as_tuple(), single.as_tuple(), strict=True):
        assert torch.equal(got, expected)


def test_f04_no_second_eos(tokenizer):
    """A response whose text already ends with EOS still ends with exactly one EOS."""
    eos = tokenizer.eos_token_id
    seq = tokenize_sequence(
        tokenizer, "\n\nHuman: Hi.\n\nAssistant:", " Hello." + tokenizer.eos_token, 64, 32
    )
    assert seq.response_ids[-1] == eos
    assert seq.response_ids.count(eos) == 1, f"response ids {seq.response_ids}"


# F06 and F07 share two short DPO runs on the tiny model.

RUN_SETTINGS = dict(
    steps=3,
    batch_size=4,
    max_prompt_tokens=24,
    max_response_tokens=10,
    capture_every=1,
    learning_rate=1e-3,
    projection=ProjectionSpec(seed=7),
)


@pytest.fixture(scope="module")
def dpo_runs(tiny_model_dir, tmp_path_factory):
    """Run A: 3 steps, batch 4, accumulation 1. Run B: 1 step, batch 4, accumulation 2."""
    runs = {}
    for name, accumulation, steps in (("a", 1, 3), ("b", 2, 1)):
        settings = dict(RUN_SETTINGS, grad_accumulation=accumulation, steps=steps)
        config = DPOConfig(model=tiny_model_dir, **settings)
        runs[name] = (train_dpo(config, tmp_path_factory.mktemp(f"run-{name}")), config)
    return runs


def _train_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_f06_reference_logprobs_used(dpo_runs, tiny_model_dir):
    policy_chosen = torch.tensor([-12.0, -30.5], dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.tensor([-14.0, -22.25], dtype=torch.float64, requires_grad=True)
    pair_ids = torch.tensor([0, 1])
    out = dpo_loss(
        policy_chosen,
        policy_rejected,
        policy_chosen.detach() - 1.0,
        policy_rejected.detach() + 1.0,
        pair_ids,
        BETA,
    )
    expected = -math.log(1.0 / (1.0 + math.exp(-0.2)))
    assert abs(expected - 0.598139) < 1e-6
    assert abs(out.loss.item() - expected) < 1e-6
    metrics = dpo_metrics(out.chosen_rewards, out.rejected_rewards, out.omega)
    assert abs(metrics["loss"] - expected) < 1e-6
    assert abs(metrics["rewards/chosen"] - 0.1) < 1e-6
    assert abs(metrics["rewards/rejected"] + 0.1) < 1e-6
    assert abs(metrics["rewards/margins"] - 0.2) < 1e-6
    assert metrics["rewards/accuracies"] == 1.0

    control = dpo_loss(
        policy_chosen, policy_rejected, policy_chosen, policy_rejected, pair_ids, BETA
    )
    assert abs(control.loss.item() - LN2) < 1e-6

    run_dir, config = dpo_runs["a"]
    log = _train_log(run_dir)
    assert [r["step"] for r in log] == [0, 1, 2]
    assert abs(log[0]["loss"] - LN2) < 1e-6, "policy and reference are equal at init"
    assert abs(log[2]["loss"] - LN2) > 1e-6, "the policy moved, so the loss left ln 2"

    initial = load_model(tiny_model_dir, "float32")
    pairs = PairTokenizer(
        load_tokenizer(tiny_model_dir),
        load_pairs().pairs,
        config.max_prompt_tokens,
        config.max_response_tokens,
    )
    shards = [read_shard(path) for path in list_shards(run_dir / "shards")]
    assert [s.step for s in shards] == [0, 1, 2]
    for shard in shards:
        pair_ids = torch.from_numpy(shard.arrays["batch/pair_ids"])
        rows = torch.cat([sequence_id(pair_ids, 0), sequence_id(pair_ids, 1)])
        assert shard.arrays["items/sequence_id"].tolist() == rows.tolist()
        with torch.no_grad():
            rescored = sequence_logprobs(initial, pairs.batch(pair_ids.tolist()))
        stored = shard.arrays["items/logp_reference"]
        assert_close(stored, rescored, 1e-6, f"reference at step {shard.step}")
    moved = np.abs(shards[-1].arrays["items/logp"] - shards[-1].arrays["items/logp_reference"])
    assert moved.max() > 1e-3, "the policy at step 2 must differ from the reference"


def test_f07_metrics_over_effective_batch(dpo_runs):
    policy_chosen = torch.tensor([-10.0, -20.0, -15.0, -30.0, -8.0, -12.0, -40.0, -25.0])
    reference_chosen = torch.tensor([-11.0, -18.0, -15.5, -29.0, -9.0, -12.0, -38.0, -26.0])
    policy_rejected = torch.tensor([-12.0, -22.0, -16.0, -28.0, -9.5, -13.0, -35.0, -27.0])
    reference_rejected = torch.tensor([-13.0, -21.0, -14.0, -28.5, -9.0, -13.0, -36.0, -26.0])
    tensors = [policy_chosen, policy_rejected, reference_chosen, reference_rejected]
    tensors = [t.double() for t in tensors]
    pair_ids = torch.arange(8)

    whole = dpo_loss(*tensors, pair_ids, BETA)
    one_batch = dpo_metrics(whole.chosen_rewards, whole.rejected_rewards, whole.omega)
    parts = []
    for start in range(0, 8, 2):
        piece = slice(start, start + 2)
        out = dpo_loss(*(t[piece] for t in tensors), pair_ids[piece], BETA, total_pairs=8)
        parts.append((out.chosen_rewards, out.rejected_rewards, out.omega, out.loss))
    chosen, rejected, omega = (torch.cat(r) for r in list(zip(*parts, strict=True))[:3])
    accumulated = dpo_metrics(chosen, rejected, omega)
    assert abs(sum(p[3] for p in parts).item() - whole.loss.item()) < 1e-12

    assert one_batch.keys() == accumulated.keys()
    for key in one_batch:
        assert abs(one_batch[key] - accumulated[key]) < 1e-6, key

    chosen_reward = BETA * (tensors[0] - tensors[2])
    rejected_reward = BETA * (tensors[1] - tensors[3])
    above = (chosen_reward > rejected_reward).double().mean().item()
    assert (chosen_reward == rejected_reward).any(), "the input holds a tie"
    assert 0.0 <= one_batch["rewards/accuracies"] <= 1.0
    assert one_batch["rewards/accuracies"] == pytest.approx(above, abs=1e-12)
    margins = (chosen_reward - rejected_reward).mean().item()
    assert one_batch["rewards/margins"] == pytest.approx(margins, abs=1e-12)
    assert one_batch["rewards/chosen"] == pytest.approx(chosen_reward.mean().item(), abs=1e-12)
    assert one_batch["loss"] == pytest.approx(whole.loss.item(), abs=1e-12)

    run_a, _ = dpo_runs["a"]
    run_b, _ = dpo_runs["b"]
    log_a, log_b = _train_log(run_a)[0], _train_log(run_b)[0]
    assert log_a.keys() == log_b.keys()
    for key in log_a:
        assert abs(log_a[key] - log_b[key]) < 1e-6, key
    assert 0.0 <= log_a["rewards/accuracies"] <= 1.0

    shard_a = read_shard(run_a / "shards" / "step_00000000.h5")
    shard_b = read_shard(run_b / "shards" / "step_00000000.h5")
    assert shard_a.attrs["normalizer"] == shard_b.attrs["normalizer"] == 4
    assert np.array_equal(shard_a.arrays["batch/pair_ids"], shard_b.arrays["batch/pair_ids"])
    items_a, items_b = (
        dict(zip(s.arrays["items/sequence_id"], s.arrays["items/logp"], strict=True))
        for s in (shard_a, shard_b)
    )
    assert items_a.keys() == items_b.keys()
    assert_close([items_b[s] for s in items_a], list(items_a.values()), 1e-6, "logp")
    rows_a, rows_b = rows_by_sequence(shard_a), rows_by_sequence(shard_b)
    assert rows_a.keys() == rows_b.keys() and len(rows_a) == 8
    for sid, row in rows_a.items():
        assert_close(rows_b[sid], row, 1e-5, f"per-sequence row of sequence {sid}")
    for component in ("positive", "negative"):
        key = f"grads/aggregate/{component}"
        assert_close(shard_b.arrays[key], shard_a.arrays[key], 1e-5, key)


# F15: per-sample gradients do not depend on the batch they were in.


def test_f15_per_sample_independent_of_batch(tiny_model, tiny_sequences, tmp_path):
    c0, r0, c1, r1 = tiny_sequences[:4]
    references = {100: (-30.0, -25.0), 101: (-28.0, -33.0)}
    pair_a = (100, c0, r0, references[100])
    pair_b = (101, c1, r1, references[101])
    config = CaptureConfig(every=1, checkpoints=False)
    (together,), _ = capture_pair_steps(tiny_model, tmp_path / "one", [[pair_a, pair_b]], config)
    alone, _ = capture_pair_steps(tiny_model, tmp_path / "two", [[pair_a], [pair_b]], config)

    assert together.attrs["normalizer"] == 2
    assert [s.attrs["normalizer"] for s in alone] == [1, 1]
    for shard in [together, *alone]:
        assert "normalizer" in shard.attrs["reduction"]
    rows_together = rows_by_sequence(together)
    rows_alone = {**rows_by_sequence(alone[0]), **rows_by_sequence(alone[1])}
    assert rows_together.keys() == rows_alone.keys() == {200, 201, 202, 203}
    for sid in rows_together:
        assert_close(rows_alone[sid], rows_together[sid], 1e-6, f"sequence {sid}")

    projector = KroneckerProjector(config.projection)
    layers = together.strings["projected_parameters"]
    own_rows = {}
    for pair_id, chosen, rejected, (ref_c, ref_r) in (pair_a, pair_b):
        lp_c, lp_r = single_logp(tiny_model, chosen), single_logp(tiny_model, rejected)
        omega = torch.sigmoid(-BETA * ((lp_c - ref_c) - (lp_r - ref_r))).detach()
        for role, term in ((0, BETA * omega * -lp_c), (1, BETA * omega * lp_r)):
            grads = named_grads(term, tiny_model)
            own_rows[2 * pair_id + role] = project_named_grads(projector, layers, grads)
    for sid, expected in own_rows.items():
        assert_close(rows_together[sid], expected, 1e-5, f"own loss of sequence {sid}")

    for component, roles in (("positive", (200, 202)), ("negative", (201, 203))):
        stored = together.arrays[f"grads/aggregate/{component}"]
        reduced = sum(rows_together[sid].astype(np.float64) for sid in roles) / 2
        assert_close(stored, reduced, 1e-6, f"{component} = sum / normalizer")
        assert_close(stored, sum(own_rows[sid] for sid in roles) / 2, 1e-5, component)


# F19: the configured projection seed is the one used, everywhere.

_SUBPROCESS = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from graddyn.capture.projection import DenseProjector, KroneckerProjector, ProjectionSpec
x = torch.randn(3, 10000, generator=torch.Generator().manual_seed(0))
dense = DenseProjector(ProjectionSpec(kind="dense", seed=1, k_out=64), 10000).project(x)
factor = KroneckerProjector(ProjectionSpec(seed=1)).factor("mlp", "in", 48, torch.device("cpu"))
from safetensors.torch import save_file
save_file({"dense": dense.contiguous(), "factor": factor.contiguous()}, sys.argv[1])
"""


def test_f19_projection_seed(tiny_model, tiny_sequences, tmp_path, dpo_runs):
    x = torch.randn(3, 10000, generator=torch.Generator().manual_seed(0))
    dense = {
        seed: DenseProjector(ProjectionSpec(kind="dense", seed=seed, k_out=64), 10000).project(x)
        for seed in (1, 2)
    }
    cpu = torch.device("cpu")
    factor = {
        seed: KroneckerProjector(ProjectionSpec(seed=seed)).factor("mlp", "in", 48, cpu)
        for seed in (1, 2)
    }
    assert dense[1].shape == (3, 64)
    assert np.corrcoef(dense[1].flatten(), dense[2].flatten())[0, 1] < 0.5
    assert not torch.allclose(factor[1], factor[2])
    again = DenseProjector(ProjectionSpec(kind="dense", seed=1, k_out=64), 10000).project(x)
    assert torch.equal(again, dense[1])

    out = tmp_path / "other_process.safetensors"
    command = [sys.executable, "-c", _SUBPROCESS, str(out), str(torch.get_num_threads())]
    subprocess.run(command, check=True, timeout=120)
    other = load_file(str(out))
    assert torch.equal(other["dense"], dense[1])
    assert torch.equal(other["factor"], factor[1])

    c0, r0, c1, r1 = tiny_sequences[:4]
    batch = [(100, c0, r0, (-30.0, -25.0)), (101, c1, r1, (-28.0, -33.0))]
    per_seed = {}
    for seed in (1234, 1235):
        config = CaptureConfig(every=1, checkpoints=False, projection=ProjectionSpec(seed=seed))
        shards, _ = capture_pair_steps(tiny_model, tmp_path / str(seed), [batch, batch], config)
        for shard in shards:
            assert shard.attrs["projection"]["seed"] == seed
            assert "1/sqrt(k)" in shard.attrs["projection"]["scaling"]
        first, second = (s.arrays["grads/per_sequence"] for s in shards)
        assert np.array_equal(first, second), "the projection must not depend on the step"
        per_seed[seed] = first
    assert not np.allclose(per_seed[1234], per_seed[1235])

    run_dir, config = dpo_runs["a"]
    shards = [read_shard(path) for path in list_shards(run_dir / "shards")]
    assert len(shards) == 3
    assert all(s.attrs["projection"]["seed"] == config.projection.seed == 7 for s in shards)
    assert read_manifest(run_dir)["capture"]["projection"]["seed"] == 7
