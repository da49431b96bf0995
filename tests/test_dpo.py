"""DPO loss, ω and items against the formulas of METHOD.md section 2; groups and regrouping."""

from __future__ import annotations

import pytest
import torch

from graddyn.data.collate import collate_sequences
from graddyn.items import Items, assign_groups, regroup
from graddyn.logprobs import sequence_logprobs
from graddyn.losses.dpo import dpo_loss, sequence_id
from tests.bruteforce import flat_grad


def random_logps(n: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (-40 * torch.rand(n, generator=generator, dtype=torch.float64)).requires_grad_(i < 2)
        for i in range(4)
    ]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_omega_match_the_formula(beta):
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = random_logps(7)
    pair_ids = torch.tensor([40, 3, 17, 8, 22, 5, 11])
    out = dpo_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, pair_ids, beta
    )
    h = (
        beta
        * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)).detach()
    )
    loss = torch.log1p(torch.exp(-h)).mean()
    assert torch.allclose(out.h, h, rtol=1e-12, atol=0)
    assert torch.allclose(out.omega, 1 / (1 + torch.exp(h)), rtol=1e-12, atol=0)
    assert abs(out.loss.item() - loss.item()) < 1e-12
    assert torch.allclose(out.chosen_rewards, beta * (policy_chosen - reference_chosen))
    assert torch.allclose(out.rejected_rewards, beta * (policy_rejected - reference_rejected))
    assert not out.omega.requires_grad

    items = out.items
    n = 7
    assert torch.equal(items.weight, torch.cat([out.omega, out.omega]))
    assert items.sign.tolist() == [1] * n + [-1] * n
    assert items.sequence_id.tolist() == [2 * i for i in pair_ids.tolist()] + [
        2 * i + 1 for i in pair_ids.tolist()
    ]
    assert items.unit_id.tolist() == pair_ids.tolist() * 2
    assert items.scale == pytest.approx(beta / n) and items.normalizer == n
    assert torch.equal(items.logp.detach(), torch.cat([policy_chosen, policy_rejected]).detach())

    grad = torch.autograd.grad(out.loss, items.logp, retain_graph=True)[0]
    assert torch.allclose(grad, -items.coefficient, rtol=1e-10, atol=1e-15)
    grads = torch.autograd.grad(out.loss, [policy_chosen, policy_rejected])
    assert torch.allclose(grads[0], -beta / n * out.omega, rtol=1e-10, atol=0)
    assert torch.allclose(grads[1], beta / n * out.omega, rtol=1e-10, atol=0)


def test_micro_batches_add_up_to_the_effective_batch():
    tensors = random_logps(6, seed=1)
    pair_ids = torch.arange(6)
    whole = dpo_loss(*tensors, pair_ids, 0.1)
    parts = [
        dpo_loss(*(t[s : s + 2] for t in tensors), pair_ids[s : s + 2], 0.1, total_pairs=6)
        for s in range(0, 6, 2)
    ]
    assert abs(sum(p.loss for p in parts).item() - whole.loss.item()) < 1e-12
    assert all(p.items.scale == pytest.approx(0.1 / 6) and p.items.normalizer == 6 for p in parts)


def test_sequence_id():
    ids = torch.tensor([0, 5, 9])
    assert sequence_id(ids, 0).tolist() == [0, 10, 18]
    assert sequence_id(ids, 1).tolist() == [1, 11, 19]


def test_surrogate_gradient_equals_dpo_gradient(tiny_model, tiny_sequences, tokenizer):
    chosen, rejected = tiny_sequences[0::2], tiny_sequences[1::2]
    n = len(chosen)
    batch = collate_sequences(chosen + rejected, tokenizer.pad_token_id)
    logp = sequence_logprobs(tiny_model, batch)
    offsets = torch.tensor([-3.0, 1.5, 0.2, -1.0, 2.0, -0.5, 0.7, -2.2], dtype=torch.float64)
    reference = logp.detach() + offsets
    out = dpo_loss(logp[:n], logp[n:], reference[:n], reference[n:], torch.arange(n), 0.2)
    assert out.omega.std() > 0.05, "the weights must differ for the test to mean something"
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    dpo = flat_grad(out.loss, params, retain=True)
    surrogate = flat_grad(out.items.surrogate_loss(), params)
    assert dpo.abs().max() > 0
    assert (surrogate - dpo).abs().max() <= 1e-10 * dpo.abs().max()


def test_items_validate_shapes_and_detachment():
    logp = torch.zeros(3, requires_grad=True)
    fields = dict(
        weight=torch.ones(3),
        sign=torch.ones(3, dtype=torch.int8),
        group=torch.zeros(3, dtype=torch.int8),
        sequence_id=torch.arange(3),
        token_index=torch.full((3,), -1),
        scale=0.5,
    )
    items = Items(logp=logp, **fields)
    assert len(items) == 3
    assert torch.equal(items.coefficient, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="weight"):
        Items(logp=logp, **{**fields, "weight": torch.ones(2)})
    with pytest.raises(ValueError, match="detached"):
        Items(logp=logp, **{**fields, "weight": torch.ones(3, requires_grad=True)})


@pytest.mark.parametrize("n", range(1, 14))
def test_assign_groups_sizes(n):
    weight = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    group = assign_groups(weight, torch.arange(n))
    q, r = divmod(n, 3)
    sizes = [int((group == g).sum()) for g in range(3)]
    assert sizes == [q + (r >= 1), q + (r == 2), q]
    assert group.dtype == torch.int8
    order = torch.argsort(weight, descending=True)
    assert group[order].tolist() == sorted(group.tolist()), "top group holds the largest"


def test_assign_groups_breaks_ties_by_id():
    ids = torch.tensor([5, 2, 9, 1, 7, 3])
    group = assign_groups(torch.full((6,), 0.5), ids)
    by_id = dict(zip(ids.tolist(), group.tolist(), strict=True))
    assert by_id == {1: 0, 2: 0, 3: 1, 5: 1, 7: 2, 9: 2}

    weight = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1])
    ids = torch.tensor([4, 8, 6, 7, 0])
    group = assign_groups(weight, ids)
    assert group.tolist() == [0, 1, 0, 1, 2]


def test_regroup_keeps_the_two_items_of_a_pair_together():
    generator = torch.Generator().manual_seed(0)
    n = 7
    pair_ids = torch.randperm(100, generator=generator)[:n]
    omega = torch.rand(n, generator=generator, dtype=torch.float64)
    omega[3] = omega[5]  # a tie, broken by pair id
    whole = assign_groups(omega, pair_ids)

    halves = [slice(0, 3), slice(3, n)]
    weight = torch.cat([torch.cat([omega[s], omega[s]]) for s in halves])
    unit_id = torch.cat([torch.cat([pair_ids[s], pair_ids[s]]) for s in halves])
    group = regroup(weight, unit_id)
    expected = dict(zip(pair_ids.tolist(), whole.tolist(), strict=True))
    for unit, g in zip(unit_id.tolist(), group.tolist(), strict=True):
        assert g == expected[unit], f"pair {unit}"
    for unit in pair_ids.tolist():
        assert len(set(group[unit_id == unit].tolist())) == 1

    alone = regroup(weight, None)
    assert [int((alone == g).sum()) for g in range(3)] == [5, 5, 4]
