"""The shard format: one self-describing HDF5 file per captured step.

A shard is written whole to a temporary name and renamed into place, so after a crash
every shard on disk is complete and readable. Layout (schema version 1):

    attrs            schema_version, graddyn_version, step, and every run/step attribute;
                     dicts, lists and None are JSON strings under the same key, and the
                     attribute `json_attrs` lists those keys
    strings/<name>   variable-length UTF-8 string datasets (parameter names, layers)
    <path>           numeric datasets, e.g. items/weight, batch/pair_ids,
                     grads/per_sequence, grads/aggregate/positive

`docs/shard-schema.md` lists every dataset and attribute the capture session writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from graddyn import __version__
from graddyn.store.h5 import open_h5

SCHEMA_VERSION = 1
JSON_ATTRS = "json_attrs"
STRING = h5py.string_dtype(encoding="utf-8")


@dataclass
class ShardRecord:
    """The content of one shard, as plain numpy arrays, strings and attributes."""

    step: int
    attrs: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strings: dict[str, list[str]] = field(default_factory=dict)


def shard_name(step: int) -> str:
    return f"step_{step:08d}.h5"


def write_shard(path: str | Path, record: ShardRecord) -> Path:
    """Write `record` to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open_h5(tmp, "w") as handle:
        handle.attrs["schema_version"] = SCHEMA_VERSION
        handle.attrs["graddyn_version"] = __version__
        handle.attrs["step"] = record.step
        json_keys = [key for key, value in record.attrs.items() if _needs_json(value)]
        handle.attrs[JSON_ATTRS] = json.dumps(json_keys)
        for key, value in record.attrs.items():
            handle.attrs[key] = json.dumps(value) if key in json_keys else value
        for name, values in record.strings.items():
            handle.create_dataset(f"strings/{name}", data=list(values), dtype=STRING)
        for name, array in record.arrays.items():
            array = np.asarray(array)
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise ValueError(f"{path}: dataset {name} holds non-finite values")
            handle.create_dataset(name, data=array)
    os.replace(tmp, path)
    return path


def _needs_json(value) -> bool:
    """Dicts, lists, tuples and None are stored as JSON strings, listed in `JSON_ATTRS`."""
    return value is None or isinstance(value, dict | list | tuple)


@dataclass
class Shard:
    """A shard read back: attributes (JSON decoded), arrays and string lists."""

    path: Path
    attrs: dict
    arrays: dict[str, np.ndarray]
    strings: dict[str, list[str]]

    @property
    def step(self) -> int:
        return int(self.attrs["step"])


def read_shard(path: str | Path) -> Shard:
    """Read a whole shard; strings come back as `str`, JSON attributes as Python objects."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    strings: dict[str, list[str]] = {}
    with open_h5(path, "r") as handle:
        version = int(handle.attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{path}: schema_version {version}, this graddyn reads {SCHEMA_VERSION}"
            )
        json_keys = set(json.loads(handle.attrs.get(JSON_ATTRS, "[]")))
        attrs = {
            key: _decode_attr(value, key in json_keys)
            for key, value in handle.attrs.items()
            if key != JSON_ATTRS
        }

        def visit(name: str, obj) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            if name.startswith("strings/"):
                strings[name.removeprefix("strings/")] = list(obj.asstr()[()])
            else:
                arrays[name] = obj[()]

        handle.visititems(visit)
    return Shard(path, attrs, arrays, strings)


def _decode_attr(value, is_json: bool):
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if is_json:
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def list_shards(directory: str | Path) -> list[Path]:
    """Complete shards in `directory`, by step (temporary files of a crash are ignored)."""
    return sorted(Path(directory).glob("step_*.h5"))
