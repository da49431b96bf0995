"""Per-sample gradients of every supported layer type against brute force.

Brute force: one sequence at a time, unpadded, float64, `torch.autograd.grad`. The
captured quantities (explicit gradients, exact norms, exact dot products with a
direction, projections) come from one padded batched backward pass through the hooks.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from graddyn.capture.hooks import Collect, LayerHooks
from graddyn.capture.projection import KroneckerProjector, ProjectionSpec
from graddyn.data.collate import collate_sequences
from graddyn.logprobs import sequence_logprobs
from graddyn.models import disable_dropout
from tests.bruteforce import named_grads, project_named_grads, single_logp
from tests.conftest import make_tiny_model

SPEC = ProjectionSpec(seed=3, k_in=4, k_out=5)


def tiny_gpt2(vocab: int) -> torch.nn.Module:
    torch.manual_seed(1)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=vocab, n_positions=128, tie_word_embeddings=True
    )
    model = GPT2LMHeadModel(config)
    disable_dropout(model)
    return model.double().eval()


def tiny_llama(vocab: int) -> torch.nn.Module:
    torch.manual_seed(2)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).double().eval()


MODELS = {
    "gpt-neox": lambda vocab: make_tiny_model(vocab),
    "gpt2-tied-conv1d": tiny_gpt2,
    "llama-rmsnorm-tied": tiny_llama,
}


def capture(model, sequences, pad_id, collect, padding_side="right"):
    """Hooked quantities of `Σ_b c_b · (-log π_b)` for distinct weights c_b."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    hooks = LayerHooks(model, SPEC, names)
    hooks.collect = collect
    hooks.arm()
    batch = collate_sequences(sequences, pad_id, padding_side)
    weights = torch.linspace(0.5, 2.0, len(sequences), dtype=torch.float64)
    (weights * -sequence_logprobs(model, batch)).sum().backward()
    hooks.disarm()
    model.zero_grad()
    return hooks, weights


def brute_force(model, sequences, weights):
    return [
        named_grads(w * -single_logp(model, s), model)
        for w, s in zip(weights, sequences, strict=True)
    ]


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_quantity_matches_brute_force(kind, tokenizer, tiny_sequences):
    model = MODELS[kind](len(tokenizer))
    pad = len(tokenizer) - 1  # a token id no sequence uses
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    collect = Collect(projected=True, norms=True, explicit=True, directions={"v": direction})
    hooks, weights = capture(model, tiny_sequences, pad, collect)
    expected = brute_force(model, tiny_sequences, weights)

    names = [slot.name for slot in hooks.layout]
    assert set(names) == {n for n, _ in model.named_parameters()}
    explicit = hooks.flat_explicit().double()
    norms = hooks.squared_norms().double()
    dots = hooks.directional("v").double()
    rows = hooks.flat_rows().double()
    projector = KroneckerProjector(SPEC)
    for b, grads in enumerate(expected):
        flat = torch.cat([grads[n].reshape(-1) for n in names])
        scale = flat.abs().max()
        assert torch.allclose(explicit[b], flat, rtol=1e-5, atol=1e-5 * scale), kind
        assert torch.allclose(norms[b], flat.pow(2).sum(), rtol=1e-5)
        terms = [grads[n] * direction[n] for n in names]
        dot = sum(t.sum() for t in terms)
        magnitude = sum(t.abs().sum() for t in terms)  # G-style tolerance: cancellation
        assert abs(dots[b] - dot) <= 1e-6 * magnitude
        row = project_named_grads(projector, names, grads)
        assert torch.allclose(rows[b], row, rtol=1e-5, atol=1e-5 * row.abs().max())


def test_tied_embedding_is_one_gradient(tokenizer, tiny_sequences):
    model = tiny_gpt2(len(tokenizer))
    hooks, _ = capture(model, tiny_sequences, 0, Collect(projected=True))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert [s.name for s in hooks.layout].count("transformer.wte.weight") == 1
    assert "lm_head.weight" not in [s.name for s in hooks.layout]
    assert hooks.uses["transformer.wte.weight"] == 2


def test_padding_row_gets_exactly_zero(tokenizer, tiny_sequences):
    model = make_tiny_model(len(tokenizer))
    pad = len(tokenizer) - 1
    for side in ("left", "right"):
        hooks, _ = capture(
            model, tiny_sequences, pad, Collect(projected=False, explicit=True), padding_side=side
        )
        embedding = hooks._joined(hooks.explicit, "gpt_neox.embed_in.weight")
        assert torch.count_nonzero(embedding[:, pad]) == 0, side


def test_chunked_capture_is_identical(tokenizer, tiny_sequences):
    model = make_tiny_model(len(tokenizer))
    results = []
    for chunk in (None, 3, 1):
        collect = Collect(projected=True, norms=True, explicit=True, chunk_rows=chunk)
        hooks, _ = capture(model, tiny_sequences, 0, collect)
        results.append((hooks.flat_rows(), hooks.squared_norms(), hooks.flat_explicit()))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * a.abs().max())


def test_unsupported_trainable_module_is_refused_by_name(tokenizer):
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(1))

    model = make_tiny_model(len(tokenizer))
    model.gpt_neox.extra_scale = Scale()
    names = {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match=r"gpt_neox\.extra_scale \(Scale\)"):
        LayerHooks(model, SPEC, names)
    model.gpt_neox.extra_scale.requires_grad_(False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    LayerHooks(model, SPEC, names)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_captures_once(reentrant, tokenizer, tiny_sequences):
    model = make_tiny_model(len(tokenizer))
    plain, _ = capture(model, tiny_sequences, 0, Collect(projected=True, norms=True))
    expected = plain.flat_rows(), plain.squared_norms()
    model.train()
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    hooks, _ = capture(model, tiny_sequences, 0, Collect(projected=True, norms=True))
    assert torch.allclose(hooks.flat_rows(), expected[0], rtol=1e-6, atol=1e-12)
    assert torch.allclose(hooks.squared_norms(), expected[1], rtol=1e-6)


def test_dense_projection_of_a_small_scope(tokenizer, tiny_sequences, monkeypatch):
    import graddyn.capture.hooks as hooks_module
    from graddyn.capture.projection import DenseProjector

    model = make_tiny_model(len(tokenizer))
    spec = ProjectionSpec(kind="dense", seed=4, k_out=64)
    scope = {n for n, _ in model.named_parameters() if n.startswith("gpt_neox.layers.1.")}
    hooks = LayerHooks(model, spec, scope)
    hooks.collect = Collect(projected=True)
    hooks.arm()
    batch = collate_sequences(tiny_sequences, 0)
    weights = torch.linspace(0.5, 2.0, len(tiny_sequences), dtype=torch.float64)
    (weights * -sequence_logprobs(model, batch)).sum().backward()
    rows = hooks.flat_rows()
    projector = DenseProjector(spec, hooks.parameter_count)
    names = [slot.name for slot in hooks.layout]
    for b, grads in enumerate(brute_force(model, tiny_sequences, weights)):
        flat = torch.cat([grads[n].reshape(-1) for n in names])
        expected = projector.project(flat.unsqueeze(0))[0]
        assert torch.allclose(rows[b], expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    monkeypatch.setattr(hooks_module, "DENSE_LIMIT", 1000)
    with pytest.raises(ValueError, match="kronecker"):
        LayerHooks(model, spec, scope)


def test_passes_without_gradient_are_ignored(tokenizer, tiny_sequences):
    """A reference forward through the same modules (PEFT with adapters off) never counts."""
    model = make_tiny_model(len(tokenizer))
    names = {n for n, _ in model.named_parameters()}
    results = []
    for extra_pass in (False, True):
        hooks = LayerHooks(model, SPEC, names)
        hooks.collect = Collect(projected=True, norms=True)
        hooks.arm()
        batch = collate_sequences(tiny_sequences, 0)
        if extra_pass:
            with torch.no_grad():
                sequence_logprobs(model, batch)
        loss = -sequence_logprobs(model, batch).sum()
        if extra_pass:
            with torch.no_grad():
                sequence_logprobs(model, batch)
        loss.backward()
        hooks.disarm()
        model.zero_grad()
        results.append((hooks.flat_rows(), hooks.squared_norms()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
