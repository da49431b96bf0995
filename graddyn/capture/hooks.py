"""Per-sample projected gradients of Linear layers, computed inside forward/backward hooks.

For a Linear layer with inputs `x` (B, T, in) and output gradients `g` (B, T, out), the
gradient of row b is `Σ_t g[b,t] x[b,t]ᵀ`. The hooks project `x` and `g` separately and
only keep the (B, k_out, k_in) result, so neither the per-sample gradient nor any extra
backward pass is needed. The hooks read tensors the training pass already computes and
change nothing: the gradient the optimizer sees is the same bit for bit.

Only Linear layers are captured per sample; the parameters of other modules in scope
(embeddings, norms) appear in checkpoints and in exact replay, but not in the projected
per-sample gradients. `LinearHooks.layout` lists exactly which parameters are projected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graddyn.capture.projection import KroneckerProjector


@dataclass(frozen=True)
class LayerSlot:
    """Where one layer's projected gradient sits in a flat per-sample row."""

    layer: str
    weight_shape: tuple[int, int]
    has_bias: bool
    offset: int
    size: int


class LinearHooks:
    """Hooks on the Linear layers of a model, armed only while a step is being captured.

    While armed, every forward pass with gradient enabled stores each layer's input and
    hooks its output; when the gradient of that output arrives, the projected per-row
    gradients are added to `self.rows[layer]`. Passes under `torch.no_grad()` (reference
    models, generation) are ignored, and so are backward passes run while `paused`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        projector: KroneckerProjector,
        parameter_names: set[str],
        exclude: set[str] | None = None,
    ) -> None:
        self.projector = projector
        self.modules: dict[str, torch.nn.Linear] = {}
        for name, module in model.named_modules():
            if name in (exclude or set()):
                continue
            if isinstance(module, torch.nn.Linear) and f"{name}.weight" in parameter_names:
                self.modules[name] = module
        self.layout = self._layout()
        self.width = sum(slot.size for slot in self.layout)
        self.rows: dict[str, torch.Tensor] = {}
        self.paused = False
        self._handles: list = []

    def _layout(self) -> list[LayerSlot]:
        slots, offset = [], 0
        k_in, k_out = self.projector.spec.k_in, self.projector.spec.k_out
        for name, module in self.modules.items():
            has_bias = module.bias is not None and module.bias.requires_grad
            size = k_out * k_in + (k_out if has_bias else 0)
            shape = (module.out_features, module.in_features)
            slots.append(LayerSlot(name, shape, has_bias, offset, size))
            offset += size
        return slots

    def arm(self) -> None:
        """Start collecting for one micro-batch (forward hooks stay until `disarm`)."""
        self.rows = {}
        self.paused = False
        if not self._handles:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))

    def disarm(self) -> None:
        """Remove the hooks; the model runs exactly as without graddyn."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def flat_rows(self) -> torch.Tensor:
        """(B, width) projected per-row gradients of the last micro-batch, in layout order."""
        missing = [slot.layer for slot in self.layout if slot.layer not in self.rows]
        if missing:
            raise RuntimeError(
                f"no gradient reached layers {missing[:3]}: call start_step() before the "
                "forward pass, observe() after it, and loss.backward() before end_step()"
            )
        return torch.cat([self.rows[slot.layer] for slot in self.layout], dim=1)

    def _forward_hook(self, name: str):
        def hook(module: torch.nn.Linear, args: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            inputs = args[0].detach()
            output.register_hook(lambda grad: self._on_output_grad(name, module, inputs, grad))

        return hook

    def _on_output_grad(
        self, name: str, module: torch.nn.Linear, inputs: torch.Tensor, grad: torch.Tensor
    ) -> None:
        if self.paused:
            return
        batch = grad.shape[0]
        x = inputs.reshape(batch, -1, inputs.shape[-1])
        g = grad.detach().reshape(batch, -1, grad.shape[-1])
        weight, bias = self.projector.project_weight_gradient(name, x, g)
        parts = [weight.reshape(batch, -1)]
        if module.bias is not None and module.bias.requires_grad:
            parts.append(bias)
        row = torch.cat(parts, dim=1)
        self.rows[name] = self.rows[name] + row if name in self.rows else row
