"""The DPO reference loop, built on the public capture API like any user's loop.

Per step: an effective batch of pairs, split into `grad_accumulation` micro-batches;
reference log-probs from a frozen copy of the initial policy; the DPO loss in its
decomposed form (items: chosen = positive, rejected = negative, weight ω); AdamW.
Metrics are computed over the whole effective batch after the last micro-batch.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from graddyn.capture.projection import ProjectionSpec
from graddyn.capture.session import CaptureConfig, CaptureSession
from graddyn.checkpoints import save_parameters
from graddyn.data.batches import PairTokenizer, effective_batches
from graddyn.data.pairs import load_pairs, split_pairs
from graddyn.logprobs import sequence_logprobs
from graddyn.losses.dpo import dpo_loss, dpo_metrics, sequence_id
from graddyn.models import load_model, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class DPOConfig:
    """Everything that determines a DPO run (stored in the run manifest)."""

    model: str = "default"
    data: str | None = None
    held_out_fraction: float = 0.1
    split_seed: int = 0
    beta: float = 0.1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accumulation: int = 1
    max_prompt_tokens: int = 128
    max_response_tokens: int = 64
    steps: int = 60
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    capture_every: int = 10
    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    full_aggregates: bool = False

    def __post_init__(self) -> None:
        if self.batch_size % self.grad_accumulation:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of "
                f"grad_accumulation {self.grad_accumulation}"
            )


def run_attributes(config: DPOConfig, model: torch.nn.Module, data_path: str) -> dict:
    """Run-level attributes every shard and the manifest carry."""
    attrs = asdict(config)
    attrs.pop("projection")
    attrs.update(
        algorithm="dpo",
        loss="dpo",
        item_kind="sequence",
        weight_name="omega",
        data=data_path,
        attention_implementation=getattr(model.config, "_attn_implementation", "unknown"),
        dropout_disabled=True,
    )
    return attrs


def train_dpo(
    config: DPOConfig,
    run_dir: str | Path,
    on_step: Callable[[int, dict], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Train with DPO, capturing on schedule into `run_dir`; returns the run directory.

    `run_dir` must be new or empty; `overwrite` replaces an earlier run in it."""
    run_dir = Path(run_dir)
    torch.manual_seed(config.seed)
    pair_file = load_pairs(config.data)
    if pair_file.skipped:
        logger.warning(
            "%s: skipped %d rows: %s",
            pair_file.path,
            len(pair_file.skipped),
            pair_file.skipped_by_reason(),
        )
    train_pairs, _ = split_pairs(pair_file.pairs, config.held_out_fraction, config.split_seed)
    tokenizer = load_tokenizer(config.model)
    policy = load_model(config.model, config.dtype, config.device)
    reference = copy.deepcopy(policy).requires_grad_(False)
    pairs = PairTokenizer(
        tokenizer, train_pairs, config.max_prompt_tokens, config.max_response_tokens
    )
    batches = effective_batches(
        [p.pair_id for p in train_pairs], config.batch_size, config.steps, config.seed
    )
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    attrs = run_attributes(config, policy, pair_file.path)
    attrs["skipped_rows"] = pair_file.skipped_by_reason()
    capture = CaptureConfig(
        every=config.capture_every,
        projection=config.projection,
        full_aggregates=config.full_aggregates,
    )
    micro_size = config.batch_size // config.grad_accumulation

    with (
        CaptureSession(policy, run_dir, capture, config.steps, attrs, overwrite) as session,
        open(run_dir / "train_log.jsonl", "w") as log,
    ):
        for step, pair_ids in enumerate(batches):
            session.start_step(step)
            optimizer.zero_grad(set_to_none=True)
            rewards = []
            for start in range(0, config.batch_size, micro_size):
                micro_ids = torch.tensor(pair_ids[start : start + micro_size])
                rewards.append(_micro_step(policy, reference, pairs, micro_ids, config, session))
            optimizer.step()

            chosen, rejected, omega = (torch.cat(r) for r in zip(*rewards, strict=True))
            metrics = dpo_metrics(chosen, rejected, omega)
            session.end_step(
                {"pair_ids": torch.tensor(pair_ids)}, optimizer.param_groups[0]["lr"], metrics
            )
            log.write(json.dumps({"step": step, **metrics}) + "\n")
            log.flush()
            if on_step is not None:
                on_step(step, metrics)
    save_parameters(policy, run_dir / "checkpoints" / "final.safetensors")
    return run_dir


def _micro_step(
    policy,
    reference,
    pairs: PairTokenizer,
    micro_ids: torch.Tensor,
    config: DPOConfig,
    session: CaptureSession,
):
    """Forward, loss and backward of one micro-batch; returns its rewards and ω."""
    n = micro_ids.shape[0]
    batch = pairs.batch(micro_ids.tolist()).to(config.device)
    with torch.no_grad():
        reference_logp = sequence_logprobs(reference, batch)
    logp = sequence_logprobs(policy, batch)
    out = dpo_loss(
        logp[:n],
        logp[n:],
        reference_logp[:n],
        reference_logp[n:],
        micro_ids,
        config.beta,
        total_pairs=config.batch_size,
    )
    rows = torch.cat([sequence_id(micro_ids, 0), sequence_id(micro_ids, 1)])
    session.observe(out.items, out.loss, batch, rows, extras={"logp_reference": reference_logp})
    out.loss.backward()
    return out.chosen_rewards, out.rejected_rewards, out.omega
