"""Seeded random projections that are regenerated from their spec, never stored.

Every matrix is drawn on the CPU from a `torch.Generator` seeded by a stable hash of
(seed, layer name, side), as float32 Gaussians scaled by `1/sqrt(k)` (the JL scaling,
so that `E‖Px‖² = ‖x‖²`). The same spec therefore gives bitwise the same matrices in
every process and on every device.

* `KroneckerProjector` projects the per-sample gradient of a matrix parameter, e.g. a
  Linear layer's `Σ_t g_t x_tᵀ` (out x in), to `P_out (Σ_t g_t x_tᵀ) P_inᵀ`
  (k_out x k_in) by projecting the two factors separately, so the per-sample gradient is
  never formed; a vector parameter (bias, norm weight) is projected by `P_out` alone.
  Factors are keyed by parameter name, so a weight tied between two modules is
  projected once.
* `DenseProjector` projects a flat vector of a small parameter subset with one dense
  matrix, generated in row blocks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ProjectionSpec:
    """What regenerates a projection: its kind, sizes and seed (stored in every shard)."""

    kind: str = "kronecker"
    seed: int = 0
    k_in: int = 16
    k_out: int = 16
    scaling: str = "1/sqrt(k) per factor"

    def to_dict(self) -> dict:
        return asdict(self)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, identical across processes (unlike `hash`)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def gaussian_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """(rows, cols) float32 N(0, 1/rows) matrix from a CPU generator seeded with `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    matrix = torch.randn(rows, cols, generator=generator, dtype=torch.float32)
    return matrix / math.sqrt(rows)


class KroneckerProjector:
    """Per-layer factors `P_in` (k_in x in) and `P_out` (k_out x out), cached per device."""

    def __init__(self, spec: ProjectionSpec) -> None:
        if spec.kind != "kronecker":
            raise ValueError(f"KroneckerProjector needs kind 'kronecker', got {spec.kind!r}")
        self.spec = spec
        self._cache: dict[tuple[str, str, torch.device], torch.Tensor] = {}

    def factor(self, layer: str, side: str, width: int, device: torch.device) -> torch.Tensor:
        """The projection factor of one side (`"in"` or `"out"`) of a layer."""
        key = (layer, side, device)
        if key not in self._cache:
            k = self.spec.k_in if side == "in" else self.spec.k_out
            seed = stable_seed(self.spec.seed, layer, side)
            self._cache[key] = gaussian_matrix(k, width, seed).to(device)
        return self._cache[key]

    def project_weight_gradient(
        self, layer: str, inputs: torch.Tensor, output_grads: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample projected weight and bias gradients of a Linear layer.

        Args:
            inputs: (B, T, in) layer inputs.
            output_grads: (B, T, out) gradients of the loss with respect to the outputs.

        Returns:
            (B, k_out, k_in) projected weight gradients and (B, k_out) projected bias
            gradients, in float32.
        """
        device = inputs.device
        p_in = self.factor(layer, "in", inputs.shape[-1], device)
        p_out = self.factor(layer, "out", output_grads.shape[-1], device)
        x = inputs.float() @ p_in.T
        g = output_grads.float() @ p_out.T
        return torch.einsum("bto,bti->boi", g, x), g.sum(dim=1)

    def project_dense_weight(self, layer: str, weight_grad: torch.Tensor) -> torch.Tensor:
        """Project an explicit (out x in) weight gradient the same way (for checks)."""
        p_in = self.factor(layer, "in", weight_grad.shape[1], weight_grad.device)
        p_out = self.factor(layer, "out", weight_grad.shape[0], weight_grad.device)
        return p_out @ weight_grad.float() @ p_in.T

    def project_parameter(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The flat projection of an explicit gradient of parameter `name`, as the capture
        hooks compute it: `P_out G P_inᵀ` for a matrix, `P_out g` for a vector."""
        if grad.dim() == 2:
            return self.project_dense_weight(name, grad).reshape(-1)
        return self.factor(name, "out", grad.shape[0], grad.device) @ grad.float()


class DenseProjector:
    """A dense seeded JL projection of flat vectors of dimension `dim` to `spec.k_out`.

    Meant for small parameter subsets: the matrix has `k x dim` entries. Row `r` is drawn
    from its own seed `(spec.seed, "dense", r)`, so the matrix depends on the spec alone,
    and it is generated `block_rows` rows at a time to bound memory.
    """

    def __init__(self, spec: ProjectionSpec, dim: int, block_rows: int = 256) -> None:
        if spec.kind != "dense":
            raise ValueError(f"DenseProjector needs kind 'dense', got {spec.kind!r}")
        self.spec, self.dim, self.block_rows = spec, dim, block_rows

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of the (k, dim) matrix, N(0, 1/k) entries, float32."""
        k = self.spec.k_out
        return torch.cat(
            [
                gaussian_matrix(1, self.dim, stable_seed(self.spec.seed, "dense", row))
                for row in range(start, stop)
            ]
        ) / math.sqrt(k)

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """(n, dim) -> (n, k) in float32, accumulating in float32 whatever the input dtype."""
        if vectors.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got {vectors.shape[-1]}")
        flat = vectors.reshape(-1, self.dim).float()
        k = self.spec.k_out
        out = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)
        for start in range(0, k, self.block_rows):
            stop = min(start + self.block_rows, k)
            out[:, start:stop] = flat @ self.rows(start, stop).to(flat.device).T
        return out.reshape(*vectors.shape[:-1], k)
