"""Per-sample gradients from a layer's saved inputs and its output gradients.

One sampler per layer type, registered in `SAMPLERS` (the Opacus pattern). A sampler
turns what the forward pass saved and the gradient of the layer's output into *factors*
of each parameter's per-sample gradient, and every quantity graddyn computes (projected
gradients, exact norms, exact dot products with a direction, explicit gradients) is
computed from the factors without forming more than it needs:

* `Outer(left, right)`: the per-sample gradient of a matrix parameter is
  `Σ_t left[b,t] ⊗ right[b,t]` (Linear: output gradient ⊗ input);
* `Lookup(ids, right, rows)`: the same with `left` one-hot (an embedding table);
* `Vector(values)`: the per-sample gradient of a vector parameter itself (biases, norms).

Supported: `torch.nn.Linear`, `transformers`' `Conv1D` (GPT-2), `torch.nn.Embedding`,
`torch.nn.LayerNorm`, and RMSNorm layers of the form `weight * x / rms(x)`
(`torch.nn.RMSNorm` and the `*RMSNorm` classes of Llama-style models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _acc(tensor: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: float64 stays float64, everything else becomes float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


@dataclass
class Outer:
    """Per-sample gradient `Σ_t left[b,t] right[b,t]ᵀ` of a (rows, cols) parameter."""

    left: torch.Tensor  # (B, T, rows)
    right: torch.Tensor  # (B, T, cols)


@dataclass
class Lookup:
    """Per-sample gradient `Σ_t e(ids[b,t]) right[b,t]ᵀ`; `valid` masks ignored positions."""

    ids: torch.Tensor  # (B, T) long
    right: torch.Tensor  # (B, T, cols)
    rows: int


@dataclass
class Vector:
    """Per-sample gradient of a vector parameter."""

    values: torch.Tensor  # (B, n)


Factor = Outer | Lookup | Vector


class LinearSampler:
    """`y = x Wᵀ + b`: weight gradient `Σ_t g_t x_tᵀ`, bias gradient `Σ_t g_t`."""

    @staticmethod
    def save(module, args) -> torch.Tensor:
        return args[0].detach()

    @staticmethod
    def factors(module, saved: torch.Tensor, grad: torch.Tensor) -> dict[str, Factor]:
        out = {"weight": Outer(grad, saved)}
        if module.bias is not None:
            out["bias"] = Vector(grad.sum(dim=1))
        return out


class Conv1DSampler:
    """GPT-2's `Conv1D`, `y = x W + b` with W (in, out): weight gradient `Σ_t x_t g_tᵀ`."""

    save = LinearSampler.save

    @staticmethod
    def factors(module, saved: torch.Tensor, grad: torch.Tensor) -> dict[str, Factor]:
        return {"weight": Outer(saved, grad), "bias": Vector(grad.sum(dim=1))}


class EmbeddingSampler:
    """Embedding table W (vocab, dim): gradient `Σ_t e(id_t) g_tᵀ`; the padding row gets 0."""

    @staticmethod
    def save(module, args) -> torch.Tensor:
        return args[0].detach()

    @staticmethod
    def factors(module, saved: torch.Tensor, grad: torch.Tensor) -> dict[str, Factor]:
        if module.padding_idx is not None:
            grad = grad.masked_fill((saved == module.padding_idx).unsqueeze(-1), 0.0)
        return {"weight": Lookup(saved, grad, module.num_embeddings)}


class LayerNormSampler:
    """`y = x̂ ⊙ w + b`: weight gradient `Σ_t g_t ⊙ x̂_t`, bias gradient `Σ_t g_t`."""

    save = LinearSampler.save

    @staticmethod
    def factors(module, saved: torch.Tensor, grad: torch.Tensor) -> dict[str, Factor]:
        normalized = F.layer_norm(_acc(saved), module.normalized_shape, eps=module.eps)
        out = {"weight": Vector((_acc(grad) * normalized).sum(dim=1))}
        if module.bias is not None:
            out["bias"] = Vector(_acc(grad).sum(dim=1))
        return out


class RMSNormSampler:
    """`y = w ⊙ x / rms(x)`: weight gradient `Σ_t g_t ⊙ x_t / rms(x_t)`."""

    save = LinearSampler.save

    @staticmethod
    def factors(module, saved: torch.Tensor, grad: torch.Tensor) -> dict[str, Factor]:
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
        if eps is None:
            eps = torch.finfo(saved.dtype).eps
        x = _acc(saved)
        normalized = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
        normalized = _acc(normalized.to(saved.dtype))
        return {"weight": Vector((_acc(grad) * normalized).sum(dim=1))}


def sampler_for(module: torch.nn.Module):
    """The sampler of a module, or None when graddyn has none for its type."""
    for kind, sampler in SAMPLERS:
        if isinstance(module, kind):
            return sampler
    name = type(module).__name__
    if name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor):
        return RMSNormSampler
    if name == "Conv1D" and hasattr(module, "nf"):
        return Conv1DSampler
    return None


SAMPLERS: list[tuple[type, type]] = [
    (torch.nn.Linear, LinearSampler),
    (torch.nn.Embedding, EmbeddingSampler),
    (torch.nn.LayerNorm, LayerNormSampler),
    (torch.nn.RMSNorm, RMSNormSampler),
]


def explicit(factor: Factor) -> torch.Tensor:
    """The per-sample gradients themselves, (B, *shape), in float32 or float64."""
    if isinstance(factor, Vector):
        return _acc(factor.values)
    if isinstance(factor, Outer):
        return torch.einsum("btr,btc->brc", _acc(factor.left), _acc(factor.right))
    batch, _, cols = factor.right.shape
    out = factor.right.new_zeros((batch, factor.rows, cols), dtype=_acc(factor.right).dtype)
    rows = torch.arange(batch, device=out.device).unsqueeze(1).expand_as(factor.ids)
    out.index_put_((rows, factor.ids), _acc(factor.right), accumulate=True)
    return out


def squared_norms(factor: Factor) -> torch.Tensor:
    """(B,) exact squared norms of the per-sample gradients, without forming them when the
    sequence is short enough (the "ghost norm": Σ_{t,s} ⟨l_t, l_s⟩⟨r_t, r_s⟩)."""
    if isinstance(factor, Vector):
        return _acc(factor.values).pow(2).sum(dim=1)
    right = _acc(factor.right)
    right_gram = right @ right.transpose(1, 2)
    if isinstance(factor, Lookup):
        same = (factor.ids.unsqueeze(2) == factor.ids.unsqueeze(1)).to(right.dtype)
        return (same * right_gram).sum(dim=(1, 2))
    left = _acc(factor.left)
    length, rows, cols = left.shape[1], left.shape[2], right.shape[2]
    # Ghost norms cost T²(rows + cols) per sample, the explicit gradient T·rows·cols and
    # rows·cols of memory; above a million entries the memory traffic dominates (measured
    # 2x slower for a 6000 x 256 LM head at T = 256 on CPU).
    if length * (rows + cols) < rows * cols or rows * cols >= 1 << 20:
        return ((left @ left.transpose(1, 2)) * right_gram).sum(dim=(1, 2))
    return explicit(factor).pow(2).sum(dim=(1, 2))


def directional(factor: Factor, direction: torch.Tensor) -> torch.Tensor:
    """(B,) exact ⟨per-sample gradient, direction⟩ without forming the gradients."""
    values = factor.values if isinstance(factor, Vector) else factor.right
    v = direction.to(_acc(values).dtype)
    if isinstance(factor, Vector):
        return _acc(factor.values) @ v
    if isinstance(factor, Lookup):
        return (v[factor.ids] * _acc(factor.right)).sum(dim=(1, 2))
    return ((_acc(factor.left) @ v) * _acc(factor.right)).sum(dim=(1, 2))


def projected(factor: Factor, p_rows: torch.Tensor, p_cols: torch.Tensor | None) -> torch.Tensor:
    """(B, k) projected per-sample gradients: `P_rows G P_colsᵀ` flattened, or `P G` for a
    vector; the per-sample gradient is never formed. Accumulates in float32."""
    if isinstance(factor, Vector):
        return factor.values.float() @ p_rows.T
    if isinstance(factor, Lookup):
        left = p_rows.T[factor.ids]
    else:
        left = factor.left.float() @ p_rows.T
    right = factor.right.float() @ p_cols.T
    return torch.einsum("btr,btc->brc", left, right).flatten(1)


def _left_gram(a: Outer | Lookup, b: Outer | Lookup) -> torch.Tensor:
    """(B, Ta, Tb) inner products of the row-space factors of two contributions."""
    if isinstance(a, Lookup) and isinstance(b, Lookup):
        return (a.ids.unsqueeze(2) == b.ids.unsqueeze(1)).to(_acc(a.right).dtype)
    if isinstance(a, Lookup):
        return _left_gram(b, a).transpose(1, 2)
    if isinstance(b, Lookup):
        index = b.ids.unsqueeze(1).expand(-1, a.left.shape[1], -1)
        return _acc(a.left).gather(2, index)
    return _acc(a.left) @ _acc(b.left).transpose(1, 2)


def cross(a: Factor, b: Factor) -> torch.Tensor:
    """(B,) exact ⟨per-sample gradient a, per-sample gradient b⟩ of one parameter.

    The ghost-norm identity: for `Σ_t l_t r_tᵀ` and `Σ_s l'_s r'_sᵀ` the inner product is
    `Σ_{t,s} ⟨l_t, l'_s⟩ ⟨r_t, r'_s⟩`, which never forms the gradients. Used for the
    norm of a parameter reached by several contributions (tied embeddings).
    """
    if isinstance(a, Vector):
        return (_acc(a.values) * _acc(b.values)).sum(dim=1)
    right = _acc(a.right) @ _acc(b.right).transpose(1, 2)
    return (_left_gram(a, b) * right).sum(dim=(1, 2))
