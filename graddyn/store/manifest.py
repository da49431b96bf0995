"""The run manifest `run.json`: run-level attributes, capture config, parameter scope."""

from __future__ import annotations

import json
import os
from pathlib import Path

from graddyn import __version__
from graddyn.store.shard import SCHEMA_VERSION

MANIFEST = "run.json"


def write_manifest(run_dir: str | Path, content: dict) -> Path:
    """Write `run_dir/run.json` atomically, stamped with the schema and graddyn versions."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    payload = {"schema_version": SCHEMA_VERSION, "graddyn_version": __version__, **content}
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(run_dir: str | Path) -> dict:
    """Read `run_dir/run.json`, with an error that names the file when it is missing."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a graddyn run directory (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: {error.msg}") from error
