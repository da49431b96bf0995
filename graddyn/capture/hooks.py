"""Per-sample gradient quantities of every layer in scope, computed inside hooks.

While armed, a forward hook on each supported module keeps what its sampler needs (the
input, or the token ids of an embedding) and hooks the module's output; when the gradient
of that output arrives during the user's own backward pass, the sampler's factors are
turned into what is configured:

* projected per-sample gradients (Kronecker factors per parameter, never the gradient);
* exact per-sample squared norms (ghost norms where the sequence is short enough);
* exact per-sample dot products with given directions;
* explicit per-sample gradients (for checks and benchmarks).

Everything is keyed by parameter name, so a weight shared by two modules (tied input and
output embeddings) gets one per-sample gradient, the sum of both contributions. The hooks
change nothing: the gradient the optimizer sees is the same bit for bit. Passes under
`torch.no_grad()` (reference models, generation) are ignored, and so are backward passes
run while `paused`. A trainable module with no sampler is refused when the hooks are
built, with its name.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from graddyn.capture.projection import DenseProjector, KroneckerProjector, ProjectionSpec
from graddyn.capture.samplers import (
    Factor,
    Vector,
    cross,
    directional,
    explicit,
    projected,
    sampler_for,
    squared_norms,
)

DENSE_LIMIT = 2_000_000


@dataclass(frozen=True)
class ParameterSlot:
    """Where one parameter's projected gradient sits in a flat per-sample row."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


@dataclass
class Collect:
    """Which per-sample quantities the hooks compute."""

    projected: bool = True
    norms: bool = False
    explicit: bool = False
    directions: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    chunk_rows: int | None = None


class LayerHooks:
    """Hooks on the supported modules of a model, armed only while a step is captured."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ProjectionSpec,
        parameter_names: set[str],
        exclude: set[str] | None = None,
        strict: bool = True,
    ) -> None:
        self.spec = spec
        self.collect = Collect()
        self.paused = False
        self.modules = self._find_modules(model, parameter_names, set(exclude or ()), strict)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        in_scope = [
            n for n in shapes if any(n in names.values() for _, _, names in self.modules.values())
        ]
        self.layout = self._layout(in_scope, shapes)
        self._shapes = {slot.name: slot.shape for slot in self.layout}
        self.projector = self._projector(spec)
        self.uses = {
            slot.name: sum(slot.name in names.values() for _, _, names in self.modules.values())
            for slot in self.layout
        }
        self.width = spec.k_out if self.dense else sum(slot.size for slot in self.layout)
        self._handles: list = []
        self._reset()

    @staticmethod
    def _find_modules(model, parameter_names: set[str], exclude: set[str], strict: bool) -> dict:
        name_of = {id(p): n for n, p in model.named_parameters() if n in parameter_names}
        excluded = {
            id(p)
            for name, module in model.named_modules()
            if name in exclude
            for p in module.parameters(recurse=False)
        }
        modules, unsupported = {}, []
        for name, module in model.named_modules():
            direct = {
                attr: name_of[id(p)]
                for attr, p in module.named_parameters(recurse=False)
                if id(p) in name_of and id(p) not in excluded
            }
            if not direct or name in exclude:
                continue
            sampler = sampler_for(module)
            if sampler is None:
                unsupported.append(f"{name} ({type(module).__name__})")
                continue
            modules[name] = (module, sampler, direct)
        if unsupported and strict:
            raise ValueError(
                "graddyn has no per-sample gradient for the trainable module(s) "
                f"{', '.join(unsupported)}; freeze their parameters or exclude them"
            )
        return modules

    def _layout(self, names: list[str], shapes: dict[str, tuple]) -> list[ParameterSlot]:
        slots, offset = [], 0
        k_in, k_out = self.spec.k_in, self.spec.k_out
        for name in names:
            size = k_out * k_in if len(shapes[name]) == 2 else k_out
            slots.append(ParameterSlot(name, shapes[name], offset, size))
            offset += size
        return slots

    def _projector(self, spec: ProjectionSpec):
        if spec.kind == "kronecker":
            return KroneckerProjector(spec)
        if spec.kind == "dense":
            count = self.parameter_count
            if count > DENSE_LIMIT:
                raise ValueError(
                    f"a dense projection of {count:,} parameters needs a {spec.k_out} x "
                    f"{count:,} matrix per row block; use the 'kronecker' projection or "
                    f"narrow the capture scope to at most {DENSE_LIMIT:,} parameters"
                )
            return DenseProjector(spec, count)
        raise ValueError(f"unknown projection kind {spec.kind!r}: 'kronecker' or 'dense'")

    @property
    def dense(self) -> bool:
        return self.spec.kind == "dense"

    def _reset(self) -> None:
        # Every store maps a key to {row chunk: tensor}; chunks are joined when read.
        self.rows: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        self.explicit: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        self.dots: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        self.norms: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        self._factors: dict[str, dict[int, list[Factor]]] = defaultdict(lambda: defaultdict(list))
        self._calls: dict[str, int] = defaultdict(int)

    def arm(self) -> None:
        """Start collecting for one micro-batch (forward hooks stay until `disarm`)."""
        self._reset()
        self.paused = False
        if not self._handles:
            for name, (module, sampler, _) in self.modules.items():
                hook = self._forward_hook(name, sampler)
                self._handles.append(module.register_forward_hook(hook))

    def disarm(self) -> None:
        """Remove the hooks; the model runs exactly as without graddyn."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _forward_hook(self, name: str, sampler):
        def hook(module, args, output) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            saved = sampler.save(module, args)
            output.register_hook(lambda grad: self._on_output_grad(name, saved, grad))

        return hook

    def _on_output_grad(self, name: str, saved: torch.Tensor, grad: torch.Tensor) -> None:
        if self.paused:
            return
        if self.collect.norms and self._calls[name] > 1:
            raise RuntimeError(
                f"module {name} ran more than once in one forward pass; exact "
                "per-sample norms need each module to run once"
            )
        module, sampler, names = self.modules[name]
        batch = grad.shape[0]
        grad = grad.detach().reshape(batch, -1, grad.shape[-1])
        if saved.dim() > 2:
            saved = saved.reshape(batch, -1, saved.shape[-1])
        else:
            saved = saved.reshape(batch, -1)
        step = self.collect.chunk_rows or batch
        for chunk, start in enumerate(range(0, batch, step)):
            rows = slice(start, start + step)
            for attr, factor in sampler.factors(module, saved[rows], grad[rows]).items():
                self._take(names[attr], chunk, factor)

    def _take(self, parameter: str, chunk: int, factor: Factor) -> None:
        collect = self.collect
        if collect.projected and not self.dense:
            self._add(self.rows[parameter], chunk, self._project(parameter, factor))
        if collect.explicit or (collect.projected and self.dense):
            self._add(self.explicit[parameter], chunk, explicit(factor))
        for key, direction in collect.directions.items():
            if parameter in direction:
                self._add(self.dots[key], chunk, directional(factor, direction[parameter]))
        if collect.norms:
            if self.uses[parameter] == 1:
                self._add(self.norms[parameter], chunk, squared_norms(factor))
            else:
                self._factors[parameter][chunk].append(factor)

    @staticmethod
    def _add(store: dict, key, value: torch.Tensor) -> None:
        store[key] = store[key] + value if key in store else value

    def _project(self, parameter: str, factor: Factor) -> torch.Tensor:
        device = factor.values.device if isinstance(factor, Vector) else factor.right.device
        shape = self._shapes[parameter]
        p_rows = self.projector.factor(parameter, "out", shape[0], device)
        p_cols = (
            self.projector.factor(parameter, "in", shape[1], device) if len(shape) == 2 else None
        )
        return projected(factor, p_rows, p_cols)

    def _joined(self, store: dict, parameter: str) -> torch.Tensor:
        chunks = store.get(parameter)
        if not chunks:
            raise RuntimeError(
                f"no gradient reached {parameter}: call start_step() before the forward "
                "pass, observe() after it, and loss.backward() before end_step()"
            )
        if len(chunks) == 1:
            return next(iter(chunks.values()))
        return torch.cat([chunks[i] for i in sorted(chunks)], dim=0)

    def flat_rows(self) -> torch.Tensor:
        """(B, width) projected per-row gradients of the last micro-batch, in layout order."""
        if self.dense:
            return self.projector.project(self.flat_explicit())
        return torch.cat([self._joined(self.rows, slot.name) for slot in self.layout], dim=1)

    def squared_norms(self) -> torch.Tensor:
        """(B,) exact squared norms of the per-row gradients over every parameter in scope.

        A parameter reached by several modules (tied embeddings) sums the inner products
        of all its contributions, so the cross terms count; none is formed explicitly.
        """
        for name, chunks in self._factors.items():
            for chunk, factors in chunks.items():
                self.norms[name][chunk] = sum(cross(a, b) for a in factors for b in factors)
        return sum(self._joined(self.norms, slot.name) for slot in self.layout)

    def flat_explicit(self) -> torch.Tensor:
        """(B, P) explicit per-row gradients, parameters in layout order."""
        return torch.cat(
            [self._joined(self.explicit, s.name).flatten(1) for s in self.layout], dim=1
        )

    def directional(self, key: str) -> torch.Tensor:
        """(B,) exact ⟨per-row gradient, direction `key`⟩ over the parameters it covers."""
        return self._joined(self.dots, key)

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(slot.shape) for slot in self.layout)
