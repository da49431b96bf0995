"""The sequences of a captured step, rebuilt from the tokens its shard stored."""

from __future__ import annotations

import torch

from graddyn.data.collate import FlatSequences
from graddyn.store.shard import Shard


def stored_sequences(shard: Shard) -> tuple[FlatSequences, dict[int, int]]:
    """The sequences a shard stored, and the row of each sequence id."""
    flat = FlatSequences(
        torch.from_numpy(shard.arrays["sequences/tokens"]).long(),
        torch.from_numpy(shard.arrays["sequences/response_mask"]).long(),
        torch.from_numpy(shard.arrays["sequences/offsets"]).long(),
    )
    ids = shard.arrays["sequences/sequence_id"].tolist()
    return flat, {sid: row for row, sid in enumerate(ids)}


def pad_id_of(model: torch.nn.Module) -> int:
    """A padding id for right-padded batches (its value never reaches a real token)."""
    config = model.config
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return 0
