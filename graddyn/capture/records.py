"""What a captured step collected, turned into shard arrays and checkpoint files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from graddyn.checkpoints import readable_like_other_files
from graddyn.data.collate import FlatSequences

logger = logging.getLogger(__name__)


def component_arrays(rows: dict[str, list], normalizer: int) -> dict[str, np.ndarray]:
    """`grads/<quantity>_<component>` per sequence, their sum where it is linear, and the
    component aggregates, from `{component: [(sequence ids, {quantity: rows})]}`."""
    out = {"grads/sequence_id": np.concatenate([ids for ids, _ in rows["positive"]])}
    for name in ("positive", "negative"):
        for key in rows[name][0][1]:
            out[f"grads/{key}_{name}"] = torch.cat([q[key] for _, q in rows[name]]).numpy()
    for key in ("per_sequence", "explicit"):
        if f"grads/{key}_positive" in out:
            out[f"grads/{key}"] = out[f"grads/{key}_positive"] + out[f"grads/{key}_negative"]
    if "grads/per_sequence" in out:
        for name in ("positive", "negative"):
            total = out[f"grads/per_sequence_{name}"].sum(0) / normalizer
            out[f"grads/aggregate/{name}"] = total
    return out


def store_gradients(arrays: dict[str, np.ndarray], storage_dtype: str) -> str:
    """Cast stored gradients to `storage_dtype`; fall back to float32 on overflow."""
    if storage_dtype == "float32":
        return "float32"
    if storage_dtype != "float16":
        raise ValueError(f"storage_dtype must be 'float32' or 'float16', got {storage_dtype!r}")
    keys = [k for k in arrays if k.startswith("grads/") and arrays[k].dtype.kind == "f"]
    limit = np.finfo(np.float16).max
    if any(np.abs(arrays[k]).max(initial=0.0) > limit for k in keys):
        logger.warning("gradients exceed the float16 range; this shard stores float32")
        return "float32"
    for key in keys:
        arrays[key] = arrays[key].astype(np.float16)
    return "float16"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


def update_name(step: int) -> str:
    return f"step_{step:08d}.update.safetensors"


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp))
    readable_like_other_files(tmp)
    os.replace(tmp, path)


def sequence_arrays(sequences: list[tuple[np.ndarray, FlatSequences]]) -> dict:
    """The tokens of every observed row, flat, in observation order."""
    lengths = np.concatenate([np.diff(flat.offsets.numpy()) for _, flat in sequences])
    return {
        "sequences/sequence_id": np.concatenate([ids for ids, _ in sequences]),
        "sequences/tokens": np.concatenate([flat.tokens.numpy() for _, flat in sequences]),
        "sequences/response_mask": np.concatenate(
            [flat.response_mask.numpy() for _, flat in sequences]
        ).astype(np.int8),
        "sequences/offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }


def sequence_components(items: dict[str, np.ndarray], sequence_ids: np.ndarray) -> np.ndarray:
    """+1 / -1 for sequences whose items are all positive / negative, 0 for mixed ones."""
    out = np.zeros(len(sequence_ids), dtype=np.int64)
    for index, sid in enumerate(sequence_ids):
        signs = set(items["sign"][items["sequence_id"] == sid].tolist()) - {0}
        out[index] = signs.pop() if len(signs) == 1 else 0
    return out
