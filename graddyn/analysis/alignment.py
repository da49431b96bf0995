"""Load the alignment results of a run into typed objects (statistics: `statistics.py`).

The replay stage writes `RUN_DIR/alignment/alignment.json`: for every saved checkpoint,
the gradient alignment `G = <g', ∇L>` of the whole loss, of its components (positive and
negative learning), of a control with the weight replaced by its batch mean, and of the
three weight groups (top / middle / bottom), together with the per-item weights (ω for
DPO pairs, |Â| for PPO tokens). This module turns that file into typed objects and
summarises each series of `G` values over training (sign, fluctuation, bootstrap
confidence interval of the mean), the TracIn-style SGD estimate of the targets' NLL
decrease, and the weight distribution per checkpoint. See `METHOD.md`, sections 1-3.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ALIGNMENT_FILE = Path("alignment") / "alignment.json"
GROUPS = ("top", "middle", "bottom")
COMPONENTS = ("positive", "negative")
GROUP_PARTS = ("whole", *COMPONENTS)
BASE_SERIES = ("whole", "positive", "negative", "control_mean_weight")
SERIES = (*BASE_SERIES, *(f"{group}.{part}" for group in GROUPS for part in GROUP_PARTS))
ITEM_KINDS = {"dpo": "pair", "ppo": "token"}
WEIGHT_SYMBOLS = {"omega": "ω", "abs_advantage": "|Â|"}
TRACIN_LABEL = (
    "SGD estimate of the decrease of the targets' NLL over training (TracInCP): "
    "sum over checkpoints of learning_rate * steps_since_previous * G; "
    "exact only for plain SGD with small steps"
)
UPDATE_ESTIMATE_LABEL = (
    "the same sum with the update alignment <g', θ_t - θ_t+1> / η_t (the step the "
    "optimizer actually applied) in place of G"
)


@dataclass(frozen=True)
class Target:
    """The target set D' whose likelihood `G` measures (e.g. the final responses)."""

    kind: str
    n_targets: int
    description: str


@dataclass(frozen=True)
class GroupAlignment:
    """`G` of one weight group (batch-normalised, so the three groups add up to the whole)."""

    whole: float
    positive: float
    negative: float


@dataclass(frozen=True)
class CheckpointAlignment:
    """Every `G` value measured at one checkpoint."""

    whole: float
    whole_from_parts: float
    positive: float
    negative: float
    control_mean_weight: float
    groups: dict[str, GroupAlignment]


@dataclass(frozen=True)
class PartsCheck:
    """How far the per-item parts were from the autograd whole, and the allowed error."""

    parts_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        """Whether the parts added back up to the whole within the tolerance."""
        return self.parts_error <= self.tolerance


@dataclass(frozen=True)
class Extras:
    """Quantities reported beside `G`: the gradient norms, their cosine, update alignment."""

    loss_grad_norm: float
    target_grad_norm: float
    cosine: float
    update_alignment: float | None


@dataclass(frozen=True)
class Checkpoint:
    """One replayed checkpoint: its optimizer context, alignment values and item weights."""

    step: int
    learning_rate: float
    steps_since_previous: int
    alignment: CheckpointAlignment
    check: PartsCheck
    extras: Extras
    weights: dict[str, np.ndarray]

    def all_weights(self) -> np.ndarray:
        """The weights of every item of the batch, groups concatenated."""
        return np.concatenate([self.weights[group] for group in GROUPS])


@dataclass(frozen=True)
class AlignmentResults:
    """The content of `alignment/alignment.json`, checked and typed."""

    path: Path
    schema_version: int
    loss: str
    weight_name: str
    target: Target
    dtype: str
    attention: str
    checkpoints: tuple[Checkpoint, ...]

    @property
    def item_kind(self) -> str:
        """What one weighted item is: a `pair` for DPO, a `token` for PPO."""
        return ITEM_KINDS.get(self.loss, "item")

    @property
    def weight_symbol(self) -> str:
        """The weight's symbol for labels (ω, |Â|), or its name when unknown."""
        return WEIGHT_SYMBOLS.get(self.weight_name, self.weight_name)

    @property
    def steps(self) -> np.ndarray:
        """Training step of each checkpoint."""
        return np.array([checkpoint.step for checkpoint in self.checkpoints], dtype=np.int64)

    def series(self, name: str) -> np.ndarray:
        """Values of one series over the checkpoints, e.g. `"positive"` or `"top.whole"`."""
        if name not in SERIES:
            raise KeyError(f"unknown series {name!r}; known: {', '.join(SERIES)}")
        if "." in name:
            group, part = name.split(".")
            values = [getattr(c.alignment.groups[group], part) for c in self.checkpoints]
        else:
            values = [getattr(c.alignment, name) for c in self.checkpoints]
        return np.asarray(values, dtype=np.float64)


class _Reader:
    """Reads fields of the parsed JSON and raises one-line errors naming file and field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> ValueError:
        return ValueError(f"{self.path}: {where}: {problem}")

    def get(self, obj: dict[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise self.fail(_join(where, key), "missing")
        return obj[key]

    def mapping(self, obj: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        value = self.get(obj, key, where)
        if not isinstance(value, dict):
            raise self.fail(_join(where, key), f"expected an object, got {_kind(value)}")
        return value

    def number(
        self, obj: dict[str, Any], key: str, where: str, nullable: bool = False
    ) -> float | None:
        value = self.get(obj, key, where)
        if value is None and nullable:
            return None
        return self.as_float(value, _join(where, key))

    def real(self, obj: dict[str, Any], key: str, where: str) -> float:
        value = self.number(obj, key, where)
        assert value is not None
        return value

    def as_float(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(field, f"expected a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise self.fail(field, f"expected a finite number, got {value}")
        return float(value)

    def integer(self, obj: dict[str, Any], key: str, where: str, minimum: int) -> int:
        value = self.get(obj, key, where)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(_join(where, key), f"expected an integer, got {_kind(value)}")
        if value < minimum:
            raise self.fail(_join(where, key), f"expected at least {minimum}, got {value}")
        return value

    def text(self, obj: dict[str, Any], key: str, where: str) -> str:
        value = self.get(obj, key, where)
        if not isinstance(value, str):
            raise self.fail(_join(where, key), f"expected a string, got {_kind(value)}")
        return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"[:60]


def alignment_path(run_dir: str | Path) -> Path:
    """Where the replay stage writes the alignment results of `run_dir`."""
    return Path(run_dir) / ALIGNMENT_FILE


def load_alignment(run_dir: str | Path) -> AlignmentResults:
    """Load and check the alignment results of a run.

    Args:
        run_dir: the run directory (holding `alignment/alignment.json`), or the path of an
            alignment JSON file itself.

    Returns:
        The typed results, checkpoints in the order of the file (steps strictly increasing).

    Raises:
        FileNotFoundError: the file does not exist (the replay has not run).
        ValueError: the file is not valid JSON, or a field is missing or of the wrong
            type; the message names the file and the field, e.g.
            `checkpoints[3].alignment.positive: missing`.
    """
    run_dir = Path(run_dir)
    path = run_dir if run_dir.is_file() else alignment_path(run_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no alignment results; run `graddyn replay {run_dir}` first"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason})") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {_kind(raw)}")
    return _parse_results(raw, _Reader(path))


def _parse_results(raw: dict[str, Any], reader: _Reader) -> AlignmentResults:
    version = reader.integer(raw, "schema_version", "", minimum=0)
    if version != SCHEMA_VERSION:
        raise reader.fail(
            "schema_version", f"this graddyn reads version {SCHEMA_VERSION}, got {version}"
        )
    loss = reader.text(raw, "loss", "")
    weight_name = reader.text(raw, "weight_name", "")
    dtype = reader.text(raw, "dtype", "")
    attention = reader.text(raw, "attention", "")
    target_raw = reader.mapping(raw, "target", "")
    target = Target(
        kind=reader.text(target_raw, "kind", "target"),
        n_targets=reader.integer(target_raw, "n_targets", "target", minimum=1),
        description=reader.text(target_raw, "description", "target"),
    )
    checkpoints_raw = reader.get(raw, "checkpoints", "")
    if not isinstance(checkpoints_raw, list):
        raise reader.fail("checkpoints", f"expected a list, got {_kind(checkpoints_raw)}")
    if not checkpoints_raw:
        raise reader.fail("checkpoints", "empty; the replay saved no checkpoint")
    checkpoints: list[Checkpoint] = []
    for index, item in enumerate(checkpoints_raw):
        checkpoint = _parse_checkpoint(item, f"checkpoints[{index}]", reader)
        if checkpoints and checkpoint.step <= checkpoints[-1].step:
            raise reader.fail(
                f"checkpoints[{index}].step",
                f"{checkpoint.step} does not come after the previous step {checkpoints[-1].step}",
            )
        checkpoints.append(checkpoint)
    return AlignmentResults(
        path=reader.path,
        schema_version=version,
        loss=loss,
        weight_name=weight_name,
        target=target,
        dtype=dtype,
        attention=attention,
        checkpoints=tuple(checkpoints),
    )


def _parse_checkpoint(item: Any, where: str, reader: _Reader) -> Checkpoint:
    if not isinstance(item, dict):
        raise reader.fail(where, f"expected an object, got {_kind(item)}")
    alignment_raw = reader.mapping(item, "alignment", where)
    at = f"{where}.alignment"
    groups_raw = reader.mapping(alignment_raw, "groups", at)
    groups = {}
    for group in GROUPS:
        group_raw = reader.mapping(groups_raw, group, f"{at}.groups")
        groups[group] = GroupAlignment(
            *(reader.real(group_raw, part, f"{at}.groups.{group}") for part in GROUP_PARTS)
        )
    alignment = CheckpointAlignment(
        whole=reader.real(alignment_raw, "whole", at),
        whole_from_parts=reader.real(alignment_raw, "whole_from_parts", at),
        positive=reader.real(alignment_raw, "positive", at),
        negative=reader.real(alignment_raw, "negative", at),
        control_mean_weight=reader.real(alignment_raw, "control_mean_weight", at),
        groups=groups,
    )

    check_raw = reader.mapping(item, "check", where)
    check = PartsCheck(
        parts_error=reader.real(check_raw, "parts_error", f"{where}.check"),
        tolerance=reader.real(check_raw, "tolerance", f"{where}.check"),
    )
    extras_raw = reader.mapping(item, "extras", where)
    extras = Extras(
        loss_grad_norm=reader.real(extras_raw, "loss_grad_norm", f"{where}.extras"),
        target_grad_norm=reader.real(extras_raw, "target_grad_norm", f"{where}.extras"),
        cosine=reader.real(extras_raw, "cosine", f"{where}.extras"),
        update_alignment=reader.number(
            extras_raw, "update_alignment", f"{where}.extras", nullable=True
        ),
    )

    weights_raw = reader.mapping(item, "weights", where)
    weights = {}
    for group in GROUPS:
        values = reader.get(weights_raw, group, f"{where}.weights")
        field = f"{where}.weights.{group}"
        if not isinstance(values, list):
            raise reader.fail(field, f"expected a list of numbers, got {_kind(values)}")
        weights[group] = np.array(
            [reader.as_float(value, f"{field}[{i}]") for i, value in enumerate(values)],
            dtype=np.float64,
        )

    return Checkpoint(
        step=reader.integer(item, "step", where, minimum=0),
        learning_rate=reader.real(item, "learning_rate", where),
        steps_since_previous=reader.integer(item, "steps_since_previous", where, minimum=0),
        alignment=alignment,
        check=check,
        extras=extras,
        weights=weights,
    )
