"""PPO math of METHOD.md section 3: KL, rewards, GAE, whitening, clipped loss and its items."""

from __future__ import annotations

import math

import pytest
import torch

from graddyn.data.collate import TokenizedSequence, collate_sequences, tokenize_sequence
from graddyn.items import Items
from graddyn.logprobs import response_token_logprobs
from graddyn.losses.ppo import (
    gae,
    kl_per_token,
    last_response_index,
    ppo_loss,
    sequence_kl,
    token_rewards,
    value_loss,
    whiten,
)
from tests.bruteforce import flat_grad
from tests.conftest import make_tiny_model

F64 = torch.float64


def place(per_row: list[list[float]], mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """(B, T) float64 tensor with each row's values on its mask positions, `fill` elsewhere."""
    out = torch.full(mask.shape, fill, dtype=F64)
    out[mask.bool()] = torch.tensor([v for row in per_row for v in row], dtype=F64)
    return out


def place_tensors(per_row: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=F64)
    out[mask.bool()] = torch.cat(per_row)
    return out


# --- KL and rewards (FIELD_CASES F11) ---------------------------------------------------


def f11_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F11's three tokens after one prompt column (column 0 is never a response token)."""
    mask = torch.tensor([[0, 1, 1, 1]])
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.5]], dtype=F64)
    ref = torch.tensor([[-3.0, -1.2, -1.5, -0.5]], dtype=F64)
    return logp, ref, mask


def test_f11_kl_estimators_and_logged_kl():
    logp, ref, mask = f11_inputs()
    expected = {
        "k1": [0.2, -0.5, 0.0],
        "k3": [0.018731, 0.148721, 0.0],
        "abs": [0.2, 0.5, 0.0],
    }
    sums = {"k1": -0.3, "k3": 0.167452, "abs": 0.7}
    beta, score = 0.1, torch.tensor([2.0], dtype=F64)
    for estimator, values in expected.items():
        kl = kl_per_token(logp, ref, estimator, mask)
        assert kl[0, 0] == 0, "zero outside the mask"
        assert torch.allclose(kl[0, 1:], torch.tensor(values, dtype=F64), atol=1e-6, rtol=0)
        logged = sequence_kl(kl, mask)
        assert logged.item() == pytest.approx(sums[estimator], abs=1e-6)

        rewards = token_rewards(score, kl, mask, beta)
        no_penalty = token_rewards(score, kl, mask, 0.0)
        assert torch.allclose(rewards - no_penalty, -beta * kl, atol=1e-15, rtol=0)
        entered = -(rewards.sum(dim=1) - score) / beta
        assert torch.allclose(logged, entered, atol=1e-12, rtol=0), "logged KL == KL used"

    k1 = kl_per_token(logp, ref, "k1", mask)
    assert k1[0, 2] == pytest.approx(-0.5), "negative k1 is kept, not clamped"
    generator = torch.Generator().manual_seed(0)
    many = -5 * torch.rand(64, generator=generator, dtype=F64)
    shifted = many + torch.randn(64, generator=generator, dtype=F64)
    assert (kl_per_token(many, shifted, "k3") >= 0).all()

    farther = logp.clone()
    farther[0, 1] += 0.3  # token 1 moves further above its reference log-prob
    for estimator in ("k1", "k3", "abs"):
        near = token_rewards(score, kl_per_token(logp, ref, estimator, mask), mask, beta)
        far = token_rewards(score, kl_per_token(farther, ref, estimator, mask), mask, beta)
        assert far.sum() < near.sum(), estimator
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(logp, ref, "k2")


def test_kl_is_zero_outside_the_response_without_a_mask():
    logp, ref, mask = f11_inputs()
    ref = torch.where(mask.bool(), ref, torch.zeros_like(ref))
    for estimator in ("k1", "k3", "abs"):
        assert kl_per_token(logp, ref, estimator)[0, 0] == 0


def test_reward_placement_right_left_and_no_eos(tokenizer):
    eos = tokenizer.eos_token_id
    with_eos = tokenize_sequence(tokenizer, "Hi there.", " Fine, thanks.", 8, 16)
    truncated = tokenize_sequence(tokenizer, "Hello, how are", " you doing today my friend?", 8, 3)
    assert with_eos.response_ids[-1] == eos and truncated.response_ids[-1] != eos
    scores = torch.tensor([1.5, -2.0], dtype=F64)
    for side in ("right", "left"):
        batch = collate_sequences([with_eos, truncated], eos, padding_side=side)
        mask = batch.response_mask
        kl = torch.where(mask.bool(), torch.full(mask.shape, 0.25, dtype=F64), 0.0)
        rewards = token_rewards(scores, kl, mask, 0.4)
        last = last_response_index(mask)
        for row, seq in enumerate([with_eos, truncated]):
            ends = (mask[row].nonzero().max()).item()
            assert last[row].item() == ends
            assert batch.input_ids[row, ends].item() == seq.response_ids[-1]
            expected = torch.zeros(mask.shape[1], dtype=F64)
            expected[mask[row].bool()] = -0.1
            expected[ends] += scores[row]
            assert torch.allclose(rewards[row], expected, atol=1e-15, rtol=0), (side, row)
    with pytest.raises(ValueError, match="no response token"):
        last_response_index(torch.tensor([[0, 1, 1], [0, 0, 0]]))


# --- GAE --------------------------------------------------------------------------------


def test_gae_hand_computed():
    """γ = 0.9, λ = 0.8 (γλ = 0.72), rewards [0.1, -0.2, 1.0], values [0.5, 0.4, 0.3].

    t=2: δ = 1.0 + 0 - 0.3 = 0.7;              Â = 0.7
    t=1: δ = -0.2 + 0.9·0.3 - 0.4 = -0.33;      Â = -0.33 + 0.72·0.7 = 0.174
    t=0: δ = 0.1 + 0.9·0.4 - 0.5 = -0.04;       Â = -0.04 + 0.72·0.174 = 0.08528
    returns = Â + V = [0.58528, 0.574, 1.0]
    """
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    rewards = place([[0.1, -0.2, 1.0]], mask, fill=100.0)
    values = place([[0.5, 0.4, 0.3]], mask, fill=-100.0)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = torch.tensor([[0.0, 0.08528, 0.174, 0.7, 0.0]], dtype=F64)
    assert torch.allclose(advantages, expected, atol=1e-12, rtol=0)
    expected_returns = torch.tensor([[0.0, 0.58528, 0.574, 1.0, 0.0]], dtype=F64)
    assert torch.allclose(returns, expected_returns, atol=1e-12, rtol=0)


def test_gae_left_and_right_padding_agree():
    rows_rewards = [[0.1, -0.2, 1.0], [0.3, 0.0, -0.5, 0.2, 2.0], [-1.0]]
    rows_values = [[0.5, 0.4, 0.3], [0.1, -0.3, 0.2, 0.6, 0.9], [0.7]]
    right = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]])
    results = []
    for mask in (right, left):
        rewards = place(rows_rewards, mask, fill=9.0)
        values = place(rows_values, mask, fill=-9.0)
        advantages, returns = gae(rewards, values, mask, gamma=0.95, lam=0.9)
        assert (advantages[~mask.bool()] == 0).all() and (returns[~mask.bool()] == 0).all()
        results.append((advantages[mask.bool()], returns[mask.bool()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-14, rtol=0)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-14, rtol=0)
    assert results[0][0][-1].item() == pytest.approx(-1.0 - 0.7), "single token: r - V"


# --- whitening --------------------------------------------------------------------------


def test_whiten_uses_valid_tokens_only():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    valid = [[0.3, -1.2, 2.0], [0.5, 0.1]]
    small = whiten(place(valid, mask, fill=0.0), mask)
    huge = whiten(place(valid, mask, fill=1e12), mask)
    assert torch.equal(small, huge)
    picked = torch.tensor([v for row in valid for v in row], dtype=F64)
    expected = (picked - picked.mean()) / picked.std(unbiased=False)
    assert torch.allclose(small[mask.bool()], expected, atol=1e-14, rtol=0)
    assert (small[~mask.bool()] == 0).all()
    kept = whiten(place(valid, mask, fill=1e12), mask, shift_mean=False)
    assert torch.allclose(kept[mask.bool()], expected + picked.mean(), atol=1e-14, rtol=0)


def test_whiten_single_token_and_zero_variance_are_finite():
    one = torch.tensor([[0, 0, 1, 0]])
    values = torch.tensor([[5.0, 6.0, 0.7, 8.0]], dtype=F64)
    assert torch.equal(whiten(values, one), torch.zeros_like(values))
    assert torch.equal(
        whiten(values, one, shift_mean=False), torch.tensor([[0, 0, 0.7, 0.0]], dtype=F64)
    )
    flat = torch.tensor([[0, 1, 1, 1]])
    same = torch.tensor([[3.0, 0.25, 0.25, 0.25]], dtype=F64)
    assert torch.equal(whiten(same, flat), torch.zeros_like(same))
    tiny = same + torch.tensor([[0.0, 0.0, 1e-12, -1e-12]], dtype=F64)
    centred = whiten(tiny, flat)
    assert torch.isfinite(centred).all()
    assert torch.allclose(centred, (tiny - 0.25) * flat, atol=1e-20, rtol=0), "no 1/~0 blow-up"
    with pytest.raises(ValueError, match="all zero"):
        whiten(values, torch.zeros_like(one))


# --- clipped loss and its items ---------------------------------------------------------

EPS = 0.2
ATTENTION = torch.tensor(
    [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]
)  # right-padded, left-padded, unpadded
MASK = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])
# (Â, ρ) per valid token; "clipped" marks m = 0.
TOKENS = [
    [(1.5, 1.5), (-0.7, 0.6), (0.0, 1.3)],
    [(2.0, 0.9), (-1.2, 1.4), (0.3, 0.5), (-0.4, 0.79)],
    [(0.9, 1.21), (-2.5, 1.0), (0.05, 1.1), (-0.01, 0.95), (1.1, 1.19), (-0.6, 1.25)],
]
CLIPPED = [True, True, False, False, False, False, True, True, False, False, False, False, False]


def clipped_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    logp = -0.1 - 4 * torch.rand(MASK.shape, generator=generator, dtype=F64)
    logp = torch.where(MASK.bool(), logp, 0.0).requires_grad_(True)
    log_ratio = place([[math.log(r) for _, r in row] for row in TOKENS], MASK)
    old_logp = torch.where(MASK.bool(), logp.detach() - log_ratio, 7.0)
    advantages = place([[a for a, _ in row] for row in TOKENS], MASK, fill=50.0)
    return logp, old_logp, advantages


def test_items_describe_the_clipped_loss():
    logp, old_logp, advantages = clipped_case()
    ids = torch.tensor([40, 7, 19])
    out = ppo_loss(logp, old_logp, advantages, MASK, EPS, ids, attention_mask=ATTENTION)
    items = out.items
    flat = [t for row in TOKENS for t in row]
    n = len(flat)
    assert len(items) == n and items.normalizer == n and items.scale == pytest.approx(1 / n)

    expected_loss = -sum(min(r * a, min(max(r, 1 - EPS), 1 + EPS) * a) for a, r in flat) / n
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-14)
    assert [int(m == 0) for m in out.clip_mask[MASK.bool()]] == CLIPPED
    assert out.clip_fraction.item() == pytest.approx(4 / n)
    assert out.approx_kl.item() == pytest.approx(-sum(math.log(r) for _, r in flat) / n)
    assert torch.allclose(out.ratio[MASK.bool()], torch.tensor([r for _, r in flat], dtype=F64))
    assert (out.ratio[~MASK.bool()] == 0).all() and (out.clip_mask[~MASK.bool()] == 0).all()

    grad = torch.autograd.grad(out.loss, items.logp, retain_graph=True)[0]
    assert torch.allclose(grad, -items.coefficient, atol=1e-12, rtol=0)
    padded = torch.autograd.grad(out.loss, logp, retain_graph=True)[0]
    expected = [0.0 if c else -a * r / n for (a, r), c in zip(flat, CLIPPED, strict=True)]
    assert torch.allclose(padded[MASK.bool()], torch.tensor(expected, dtype=F64), atol=1e-15)
    assert (padded[~MASK.bool()] == 0).all()
    surrogate = torch.autograd.grad(items.surrogate_loss(), logp)[0]
    assert torch.allclose(surrogate, padded, atol=1e-15, rtol=0)

    assert items.sign.dtype == torch.int8
    assert items.sign.tolist() == [1, -1, 0, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1]
    weights = [0.0 if c else abs(a) * r for (a, r), c in zip(flat, CLIPPED, strict=True)]
    assert torch.allclose(items.weight, torch.tensor(weights, dtype=F64), atol=1e-14, rtol=0)
    assert not items.weight.requires_grad
    by_size = sorted(range(n), key=lambda i: -abs(flat[i][0]))  # no ties in |Â|
    group = [0] * n
    for i in by_size[5:9]:
        group[i] = 1
    for i in by_size[9:]:
        group[i] = 2
    assert items.group.tolist() == group, "13 = 3·4 + 1 tokens: groups of 5, 4, 4 by |Â|"
    assert items.sequence_id.tolist() == [40] * 3 + [7] * 4 + [19] * 6
    assert items.token_index.tolist() == [2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 5, 6]
    assert items.unit_id is None

    by_column = ppo_loss(logp, old_logp, advantages, MASK, EPS, ids)
    assert by_column.items.token_index.tolist() == [2, 3, 4, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]


def test_ppo_loss_rejects_bad_counts():
    logp, old_logp, advantages = clipped_case()
    ids = torch.arange(3)
    with pytest.raises(ValueError, match="total_tokens=5"):
        ppo_loss(logp, old_logp, advantages, MASK, EPS, ids, total_tokens=5)
    with pytest.raises(ValueError, match="attention_mask"):
        ppo_loss(logp, old_logp, advantages, MASK, EPS, ids, attention_mask=MASK * 0)
    with pytest.raises(ValueError, match="all zero"):
        ppo_loss(logp, old_logp, advantages, MASK * 0, EPS, ids)


def test_value_loss_plain_and_clipped():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    values = place([[1.0, 2.0], [0.0, -1.0, 0.5, 3.0]], mask, fill=99.0)
    returns = place([[1.5, 1.0], [0.0, 0.0, 0.5, 2.0]], mask, fill=-99.0)
    old = place([[1.2, 1.9], [0.1, 0.0, 1.0, 2.0]], mask, fill=5.0)
    plain = value_loss(values, returns, mask)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 1.0 + 0 + 1.0 + 0 + 1.0) / 6)
    clipped = value_loss(values, returns, mask, old_values=old, clip_range=0.2)
    # clipped values: 1.0, 2.0, 0.0, -0.2, 0.8, 2.2; each token keeps the larger error
    errors = [max(0.25, 0.25), max(1.0, 1.0), 0.0, max(1.0, 0.04), max(0.0, 0.09), max(1.0, 0.04)]
    assert clipped.item() == pytest.approx(0.5 * sum(errors) / 6)
    with pytest.raises(ValueError, match="both"):
        value_loss(values, returns, mask, old_values=old)


# --- micro-batches (FIELD_CASES F08) and brute force on a tiny model --------------------


def random_sequences(vocab: int, prompt: int, lengths: list[int], seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [
        TokenizedSequence(
            torch.randint(vocab, (prompt,), generator=generator).tolist(),
            torch.randint(vocab, (length,), generator=generator).tolist(),
        )
        for length in lengths
    ]


def test_f08_micro_batches_add_up(tokenizer):
    model = make_tiny_model(len(tokenizer))
    params = [p for p in model.parameters() if p.requires_grad]
    pad = tokenizer.eos_token_id
    lengths = [2, 3, 30, 31]
    sequences = random_sequences(len(tokenizer), 3, lengths, seed=1)
    ids = torch.tensor([100, 101, 102, 103])
    total = sum(lengths)

    full = collate_sequences(sequences, pad)
    logp = response_token_logprobs(model, full)
    valid = full.response_mask.bool()
    generator = torch.Generator().manual_seed(2)
    noise = 0.3 * torch.randn(total, generator=generator, dtype=F64)
    old = list((logp.detach()[valid] + noise).split(lengths))
    adv = list(torch.randn(total, generator=generator, dtype=F64).split(lengths))
    out = ppo_loss(
        logp, place_tensors(old, valid), place_tensors(adv, valid), full.response_mask, EPS, ids
    )
    assert 0 < out.clip_fraction < 0.5, "some tokens must be clipped for the test to bite"
    whole_grad = flat_grad(out.loss, params)

    def accumulate(rows: list[list[int]], own_count: bool) -> tuple[float, torch.Tensor]:
        loss, grad = 0.0, torch.zeros_like(whole_grad)
        for part in rows:
            batch = collate_sequences([sequences[i] for i in part], pad)
            mask = batch.response_mask
            micro = ppo_loss(
                response_token_logprobs(model, batch),
                place_tensors([old[i] for i in part], mask),
                place_tensors([adv[i] for i in part], mask),
                mask,
                EPS,
                ids[part],
                total_tokens=None if own_count else total,
            )
            weight = len(part) / len(sequences) if own_count else 1.0
            loss += weight * micro.loss.item()
            grad += weight * flat_grad(micro.loss, params)
        return loss, grad

    for split in ([[0, 1], [2, 3]], [[0, 2], [1, 3]]):
        loss, grad = accumulate(split, own_count=False)
        assert abs(loss - out.loss.item()) <= 1e-9 * abs(out.loss.item()), split
        assert (grad - whole_grad).norm() <= 1e-9 * whole_grad.norm(), split
        bug_loss, bug_grad = accumulate(split, own_count=True)
        assert (bug_grad - whole_grad).norm() > 1e-2 * whole_grad.norm(), split
        assert abs(bug_loss - out.loss.item()) > 1e-3 * abs(out.loss.item()), split


def brute_force_grad(
    model: torch.nn.Module,
    sequences: list[TokenizedSequence],
    ids: torch.Tensor,
    items: Items,
    keep: torch.Tensor,
    params: list[torch.Tensor],
) -> torch.Tensor:
    """Gradient of Σ_kept coefficient · (-log π(token)), one unpadded sequence at a time."""
    total = torch.zeros((), dtype=F64)
    coefficient = items.coefficient
    for seq, seq_id in zip(sequences, ids.tolist(), strict=True):
        tokens = torch.tensor([seq.prompt_ids + seq.response_ids])
        logits = model(input_ids=tokens, use_cache=False).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        mine = ((items.sequence_id == seq_id) & keep).nonzero().flatten()
        positions = items.token_index[mine]
        picked = logp[positions - 1, tokens[0, positions]]
        total = total + (coefficient[mine] * -picked).sum()
    return flat_grad(total, params)


@pytest.mark.parametrize("side", ["right", "left"])
def test_component_gradients_match_brute_force(tokenizer, side):
    model = make_tiny_model(len(tokenizer))
    params = [p for p in model.parameters() if p.requires_grad]
    sequences = random_sequences(len(tokenizer), 4, [3, 7, 5, 9], seed=5)
    # a shorter prompt, so that rows differ in prompt and response length
    sequences[1] = TokenizedSequence(sequences[1].prompt_ids[:2], sequences[1].response_ids)
    ids = torch.tensor([11, 22, 33, 44])
    batch = collate_sequences(sequences, tokenizer.eos_token_id, padding_side=side)
    logp = response_token_logprobs(model, batch)
    mask = batch.response_mask
    generator = torch.Generator().manual_seed(6)
    noise = 0.3 * torch.randn(mask.shape, generator=generator, dtype=F64)
    advantages = whiten(torch.randn(mask.shape, generator=generator, dtype=F64), mask)
    out = ppo_loss(
        logp,
        logp.detach() + noise,
        advantages,
        mask,
        EPS,
        ids,
        attention_mask=batch.attention_mask,
    )
    items = out.items
    assert 0 < out.clip_fraction < 0.5
    assert (items.sign > 0).any() and (items.sign < 0).any()

    whole = flat_grad(out.loss, params, retain=True)
    parts = torch.zeros_like(whole)
    for keep in (items.sign > 0, items.sign < 0):
        term = (items.coefficient[keep] * -items.logp[keep]).sum()
        batched = flat_grad(term, params, retain=True)
        brute = brute_force_grad(model, sequences, ids, items, keep, params)
        assert brute.abs().max() > 0
        assert (batched - brute).abs().max() <= 1e-6 * brute.abs().max()
        parts += brute
    assert (parts - whole).abs().max() <= 1e-6 * whole.abs().max(), "components add up"
