"""Supervised fine-tuning: maximise the log-likelihood of sequences, token-mean reduced.

Used to build the shipped default model: first on whole dialogues (every token counts,
a small language-modelling stage), then on chosen responses only (the SFT stage).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from graddyn.data.collate import TokenizedSequence, collate_sequences
from graddyn.logprobs import response_token_logprobs
from graddyn.train.schedule import warmup_cosine

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    """Hyper-parameters of one SFT stage."""

    epochs: float = 1.0
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    seed: int = 0


def as_full_sequence(seq: TokenizedSequence) -> TokenizedSequence:
    """Treat the whole sequence but its first token as the response (language modelling)."""
    ids = seq.prompt_ids + seq.response_ids
    return TokenizedSequence(ids[:1], ids[1:])


def train_sft(
    model: torch.nn.Module,
    sequences: list[TokenizedSequence],
    pad_id: int,
    config: SFTConfig,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Train `model` in place on the response tokens of `sequences`; returns step losses.

    The loss is the mean negative log-likelihood over the response tokens of each batch.
    The learning rate warms up linearly, then follows a cosine decay to zero.
    """
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(sequences) / config.batch_size)
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = warmup_cosine(optimizer, total_steps, config.warmup_fraction)
    losses: list[float] = []
    order = torch.randperm(len(sequences), generator=generator)
    cursor = 0
    for step in range(total_steps):
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(sequences), generator=generator), 0
        rows = order[cursor : cursor + config.batch_size].tolist()
        cursor += config.batch_size
        batch = collate_sequences([sequences[i] for i in rows], pad_id)
        token_logp = response_token_logprobs(model, batch)
        loss = -token_logp.sum() / batch.response_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, total_steps, losses[-1])
    return losses
