"""Items: the one form in which every supported loss is handed to graddyn.

An item is a log-probability that carries gradient (of a whole response, or of one
response token) together with detached bookkeeping: a weight, a nominal sign, a group
and ids. A loss `L` fits this form when its gradient equals that of the surrogate

    L~ = scale · Σ_i sign_i · weight_i · ( -log π_i )

so each item's *coefficient* on `-log π_i` is `scale · sign_i · weight_i`. An item with
`sign = +1` is positive learning (a descent step raises its likelihood when its weight is
positive); `sign = -1` is negative learning. Capture, storage, replay and analysis only
see items, never the loss that made them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_NAMES = ("top", "middle", "bottom")
WHOLE_SEQUENCE = -1


@dataclass
class Items:
    """Per-item log-probs (with gradient) and their detached weights, signs and ids.

    Attributes:
        logp: (n,) log π of each item; carries gradient.
        weight: (n,) detached real weight (ω for DPO, |Â| for PPO); may be negative.
        sign: (n,) int8, +1 positive learning, -1 negative learning, 0 neither.
        group: (n,) int8 index into `GROUP_NAMES` (0 top, 1 middle, 2 bottom).
        sequence_id: (n,) int64 id of the sequence the item belongs to.
        token_index: (n,) int64 position of the token in its sequence, or -1 for a whole
            sequence.
        scale: the factor in front of the sum (β/N for DPO).
        unit_id: optional (n,) int64; items with the same unit id are ranked into groups
            as one (the two responses of a DPO pair). None: every item is its own unit.
        normalizer: N when the loss is a mean over N samples of each sample's own loss
            (1 for a sum). Per-sample gradients are stored as the gradient of a sample's
            own loss, so they do not depend on the batch a sample was in.
    """

    logp: torch.Tensor
    weight: torch.Tensor
    sign: torch.Tensor
    group: torch.Tensor
    sequence_id: torch.Tensor
    token_index: torch.Tensor
    scale: float
    unit_id: torch.Tensor | None = None
    normalizer: int = 1

    def __post_init__(self) -> None:
        n = self.logp.shape[0]
        for name in ("weight", "sign", "group", "sequence_id", "token_index", "unit_id"):
            value = getattr(self, name)
            if value is None:
                continue
            if value.shape != (n,):
                raise ValueError(f"Items.{name} has shape {tuple(value.shape)}, expected ({n},)")
            if value.requires_grad:
                raise ValueError(f"Items.{name} must be detached")

    def __len__(self) -> int:
        return self.logp.shape[0]

    @property
    def coefficient(self) -> torch.Tensor:
        """(n,) `scale · sign · weight`, the factor on `-log π_i` in the surrogate."""
        return self.scale * self.sign.to(self.weight.dtype) * self.weight

    def surrogate_loss(self) -> torch.Tensor:
        """`Σ_i coefficient_i · (-log π_i)`: same gradient as the loss the items came from."""
        return (self.coefficient.to(self.logp.dtype) * -self.logp).sum()


def regroup(weight: torch.Tensor, unit_id: torch.Tensor | None) -> torch.Tensor:
    """Groups of items ranked by unit (see `Items.unit_id`), over all the items given.

    Used at the end of an accumulated step, so that groups are cut over the effective
    batch and never differ between two micro-batch layouts of the same batch.
    """
    if unit_id is None:
        return assign_groups(weight, torch.arange(weight.shape[0]))
    units, first = _first_occurrence(unit_id)
    unit_group = assign_groups(weight[first], units)
    return unit_group[torch.searchsorted(units, unit_id)]


def _first_occurrence(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values and the index of each one's first occurrence."""
    units, inverse = torch.unique(values, sorted=True, return_inverse=True)
    positions = torch.arange(values.shape[0])
    first = torch.full((units.shape[0],), values.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return units, first


def assign_groups(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Split `N` items into top / middle / bottom thirds by weight (METHOD.md section 2).

    Items are ranked by descending weight, ties broken by ascending id. With `N = 3q + r`
    the top group takes one extra item when `r >= 1` and the middle group one more when
    `r == 2`, so group sizes differ by at most one.
    """
    n = weight.shape[0]
    q, r = divmod(n, 3)
    sizes = (q + (r >= 1), q + (r == 2), q)
    by_id = torch.argsort(ids, stable=True)
    by_weight = torch.argsort(-weight[by_id].double(), stable=True)
    ranked = by_id[by_weight]
    group = torch.empty(n, dtype=torch.int8)
    start = 0
    for index, size in enumerate(sizes):
        group[ranked[start : start + size]] = index
        start += size
    return group
