"""The parts of G from per-item directional derivatives: components, groups, control."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graddyn.items import GROUP_NAMES


@dataclass
class ItemAlignment:
    """Per-item values at one checkpoint, in the order of the shard's items.

    `coefficient_i = scale_i · sign_i · weight_i` is the factor on `-log π_i` in the loss,
    so the item's share of G is `-coefficient_i · δ_i`.
    """

    coefficient: np.ndarray
    weight: np.ndarray
    sign: np.ndarray
    group: np.ndarray
    unit_id: np.ndarray
    delta: np.ndarray
    scale: np.ndarray

    def part(self, mask: np.ndarray, coefficient: np.ndarray | None = None) -> float:
        """G of the items in `mask`: -Σ coefficient_i δ_i."""
        c = self.coefficient if coefficient is None else coefficient
        return float(-(c[mask] * self.delta[mask]).sum())

    def mean_weight_coefficients(self) -> np.ndarray:
        """Coefficients with each weight replaced by the batch mean over units."""
        _, first = np.unique(self.unit_id, return_index=True)
        return self.scale * self.sign * self.weight[first].mean()


def alignment_parts(items: ItemAlignment) -> dict:
    """G of the components, the groups, group x component and the mean-weight control."""
    everything = np.ones(items.sign.shape, dtype=bool)
    positive, negative = items.sign > 0, items.sign < 0
    groups = {}
    for index, name in enumerate(GROUP_NAMES):
        in_group = items.group == index
        groups[name] = {
            "whole": items.part(in_group),
            "positive": items.part(in_group & positive),
            "negative": items.part(in_group & negative),
        }
    return {
        "whole_from_parts": items.part(everything),
        "positive": items.part(positive),
        "negative": items.part(negative),
        "control_mean_weight": items.part(everything, items.mean_weight_coefficients()),
        "groups": groups,
    }


def group_weights(items: ItemAlignment) -> dict[str, list[float]]:
    """The weights of each group, one value per unit (one ω per DPO pair)."""
    _, first = np.unique(items.unit_id, return_index=True)
    return {
        name: items.weight[first][items.group[first] == index].tolist()
        for index, name in enumerate(GROUP_NAMES)
    }
