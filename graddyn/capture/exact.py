"""Exact (unprojected) quantities for alignment: the target gradient g' and δ per item.

For a direction g', every item's directional derivative `δ_i = ⟨∇θ log π_i, g'⟩` comes
from one forward-mode pass (`torch.func.jvp` with tangent g'), for all items of a batch
at once. Forward-mode AD needs the math SDPA backend on CPU, so every pass here runs
inside `sdpa_kernel(SDPBackend.MATH)` with `use_cache=False`; callers record that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from graddyn.data.collate import SequenceBatch, TokenizedSequence, collate_sequences
from graddyn.logprobs import gather_token_logprobs, sequence_logprobs

ATTENTION_BACKEND = "sdpa-math"


@contextmanager
def exact_attention() -> Iterator[None]:
    """Run attention on the math backend, which supports forward and double backward."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def target_gradient(
    model: torch.nn.Module, targets: list[TokenizedSequence], pad_id: int, chunk_size: int = 16
) -> dict[str, torch.Tensor]:
    """g' = ∇θ mean over targets of (-log π(y'|x')), in the parameters' dtype."""
    params = trainable_parameters(model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    device = next(iter(params.values())).device
    with exact_attention():
        for start in range(0, len(targets), chunk_size):
            batch = collate_sequences(targets[start : start + chunk_size], pad_id).to(device)
            loss = -sequence_logprobs(model, batch).sum() / len(targets)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), grad in zip(params.items(), grads, strict=True):
                if grad is not None:
                    total[name] += grad
    return total


def directional_token_logprobs(
    model: torch.nn.Module, batch: SequenceBatch, direction: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) response-token log-probs and their exact directional derivatives.

    Entry (b, t) of the second tensor is `⟨∇θ log π(token t of row b), direction⟩`; both
    are zero outside the response. Summing a row gives the sequence's `δ`.
    """
    names = list(direction)

    def token_logp_of(*values: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(
            model,
            dict(zip(names, values, strict=True)),
            kwargs=dict(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ),
        )
        return gather_token_logprobs(outputs.logits, batch)

    params = trainable_parameters(model)
    primals = tuple(params[n].detach() for n in names)
    tangents = tuple(direction[n].to(params[n].dtype) for n in names)
    with exact_attention():
        token_logp, token_delta = jvp(token_logp_of, primals, tangents)
    return token_logp.detach(), token_delta.detach()


def directional_logprobs(
    model: torch.nn.Module, batch: SequenceBatch, direction: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π_i, δ_i) for every row of `batch`, δ_i = ⟨∇θ log π_i, direction⟩ exactly."""
    token_logp, token_delta = directional_token_logprobs(model, batch, direction)
    return token_logp.sum(dim=1), token_delta.sum(dim=1)


def dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Σ over parameters of ⟨a, b⟩, accumulated in float64."""
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))
