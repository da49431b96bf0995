"""Brute-force references: one sample at a time, no padding, float64, plain autograd."""

from __future__ import annotations

import torch

from graddyn.data.collate import TokenizedSequence


def single_logp(model: torch.nn.Module, seq: TokenizedSequence) -> torch.Tensor:
    """Summed response log-prob of one unpadded sequence, by a plain gather."""
    ids = torch.tensor([seq.prompt_ids + seq.response_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    start = len(seq.prompt_ids)
    positions = torch.arange(start, ids.shape[1])
    return logp[positions - 1, ids[0, positions]].sum()


def flat_grad(
    value: torch.Tensor, params: list[torch.Tensor], retain: bool = False
) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=retain)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def named_grads(value: torch.Tensor, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names, params = zip(
        *[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True
    )
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return {
        n: (g if g is not None else torch.zeros_like(p))
        for n, g, p in zip(names, grads, params, strict=True)
    }


def project_named_grads(projector, names: list[str], grads: dict[str, torch.Tensor]):
    """Flat projected row of explicit gradients, in the capture layout order, float64."""
    return torch.cat([projector.project_parameter(n, grads[n]).double() for n in names])


def target_gradient(
    model: torch.nn.Module, targets: list[TokenizedSequence], params: list[torch.Tensor]
) -> torch.Tensor:
    """g' = ∇ mean over targets of -log π(y'|x'), flat, one target at a time."""
    return sum(flat_grad(-single_logp(model, t), params) for t in targets) / len(targets)
