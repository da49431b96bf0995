"""Read preference pairs from JSON-lines files and split them reproducibly.

Two row layouts are accepted, one JSON object per line, in `.jsonl` or `.jsonl.gz`:

* HH-RLHF: `{"chosen": dialogue, "rejected": dialogue}`. The prompt is everything up to
  and including the last `"\\n\\nAssistant:"` of each dialogue; the response is the rest.
* explicit: `{"prompt": ..., "chosen": ..., "rejected": ...}`.

Rows that cannot form a valid pair (chosen and rejected prompts that differ, an empty
response, a missing field, malformed JSON) are never silently kept or dropped: they are
returned as `SkippedRow`s with the line number and the reason, and callers report them.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

ASSISTANT_TAG = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair. `pair_id` is the 0-based line index in its source file."""

    pair_id: int
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class SkippedRow:
    """A row the loader refused, with the 1-based line number and why."""

    line: int
    reason: str


@dataclass
class PairFile:
    """What a preference file held: the valid pairs and the rows that were skipped."""

    path: str
    pairs: list[PreferencePair]
    skipped: list[SkippedRow] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        """Count of skipped rows per reason, for a one-line report."""
        return dict(Counter(row.reason for row in self.skipped))


def bundled_pairs_path() -> Path:
    """Path of the bundled HH-RLHF harmless-base test file (MIT licence, see its README)."""
    root = resources.files("graddyn") / "assets" / "data" / "hh-rlhf"
    return Path(str(root / "harmless-base-test.jsonl.gz"))


def split_hh_dialogue(dialogue: str) -> tuple[str, str]:
    """Split an HH-RLHF dialogue into (prompt, response) at the last assistant tag."""
    cut = dialogue.rfind(ASSISTANT_TAG)
    if cut < 0:
        raise ValueError(f"no {ASSISTANT_TAG!r} turn in the dialogue")
    end = cut + len(ASSISTANT_TAG)
    return dialogue[:end], dialogue[end:]


def _row_to_pair(row: object, pair_id: int) -> PreferencePair:
    if not isinstance(row, dict):
        raise ValueError("row is not a JSON object")
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"field '{key}' is missing or not a string")
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ValueError("field 'prompt' is not a string")
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen = split_hh_dialogue(row["chosen"])
        rejected_prompt, rejected = split_hh_dialogue(row["rejected"])
        if rejected_prompt != prompt:
            raise ValueError("chosen and rejected prompts differ")
    if not prompt.strip():
        raise ValueError("empty prompt")
    if not chosen.strip() or not rejected.strip():
        raise ValueError("empty response")
    return PreferencePair(pair_id, prompt, chosen, rejected)


def load_pairs(path: str | Path | None = None) -> PairFile:
    """Read preference pairs from `path` (default: the bundled HH-RLHF file).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no valid pair at all (the message names the file and
            the first skipped line).
    """
    path = Path(path) if path is not None else bundled_pairs_path()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such preference file")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; give a .jsonl or .jsonl.gz file")
    opener = gzip.open if path.name.endswith(".gz") else open
    pairs: list[PreferencePair] = []
    skipped: list[SkippedRow] = []
    try:
        rows = _read_rows(path, opener)
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path}: cannot be read as {'gzip ' if opener is gzip.open else ''}"
            f"UTF-8 JSON lines ({error})"
        ) from error
    for index, line in rows:
        if not line.strip():
            skipped.append(SkippedRow(index + 1, "blank line"))
            continue
        try:
            pairs.append(_row_to_pair(json.loads(line), index))
        except json.JSONDecodeError as error:
            skipped.append(SkippedRow(index + 1, f"malformed JSON ({error.msg})"))
        except ValueError as error:
            skipped.append(SkippedRow(index + 1, str(error)))
    if not pairs:
        first = f"; line {skipped[0].line}: {skipped[0].reason}" if skipped else ""
        raise ValueError(f"{path}: no valid preference pair{first}")
    return PairFile(str(path), pairs, skipped)


def _read_rows(path: Path, opener) -> list[tuple[int, str]]:
    with opener(path, "rt", encoding="utf-8") as handle:
        return list(enumerate(handle))


def split_pairs(
    pairs: list[PreferencePair], held_out_fraction: float = 0.1, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split pairs into (train, held_out), the same way on every machine for a given seed.

    The permutation comes from numpy's PCG64 seeded with `seed`, applied to pairs sorted
    by `pair_id`, so the split depends only on the ids, the fraction and the seed.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction}")
    ordered = sorted(pairs, key=lambda pair: pair.pair_id)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(ordered))
    n_held_out = max(1, round(held_out_fraction * len(ordered)))
    held = sorted(order[:n_held_out].tolist())
    train = sorted(order[n_held_out:].tolist())
    return [ordered[i] for i in train], [ordered[i] for i in held]
