"""Tokenize prompt/response pairs and collate them into padded batches with response masks.

Masks are built from sequence lengths, never by comparing ids with the pad id: many
tokenizers use the EOS token as padding, and an EOS inside a prompt or at the end of a
response is a real token that must stay visible and be scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PaddingSide = Literal["left", "right"]


@dataclass(frozen=True)
class TokenizedSequence:
    """One prompt and response as token ids; the response ends with EOS unless truncated."""

    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class SequenceBatch:
    """A padded batch of prompt+response sequences.

    Attributes:
        input_ids: (B, T) token ids, padded with `pad_id`.
        attention_mask: (B, T) 1 on real tokens (prompt or response), 0 on padding.
        position_ids: (B, T) `cumsum(attention_mask) - 1` on real tokens, 0 on padding, so
            a left-padded row is scored at the same positions as an unpadded one.
        response_mask: (B, T) 1 where the token is a response token; the log-prob of
            token t is read from the logits at t - 1.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device | str) -> SequenceBatch:
        """The same batch on `device`."""
        return SequenceBatch(*(t.to(device) for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask, self.position_ids, self.response_mask

    def select(self, rows: list[int] | torch.Tensor) -> SequenceBatch:
        """A batch of the given rows, in that order (padding is kept as it is)."""
        return SequenceBatch(*(t[rows] for t in self.as_tuple()))

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)


def tokenize_sequence(
    tokenizer,
    prompt: str,
    response: str,
    max_prompt_tokens: int,
    max_response_tokens: int,
    append_eos: bool = True,
) -> TokenizedSequence:
    """Tokenize prompt and response separately, so the boundary never moves.

    The prompt keeps its last `max_prompt_tokens` tokens (the turn being answered); the
    response keeps its first `max_response_tokens` tokens, EOS included when it fits.
    No special tokens are added besides the one EOS that ends the response, and none when
    the response text already ends with EOS.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
        if not response_ids or response_ids[-1] != tokenizer.eos_token_id:
            response_ids = response_ids + [tokenizer.eos_token_id]
    if max_prompt_tokens > 0:
        prompt_ids = prompt_ids[-max_prompt_tokens:]
    return TokenizedSequence(list(prompt_ids), list(response_ids[:max_response_tokens]))


def collate_sequences(
    sequences: list[TokenizedSequence], pad_id: int, padding_side: PaddingSide = "right"
) -> SequenceBatch:
    """Pad `sequences` to one length; masks come from lengths, not from token values."""
    if not sequences:
        raise ValueError("cannot collate an empty list of sequences")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in sequences)
    shape = (len(sequences), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.long)
    for row, seq in enumerate(sequences):
        n_prompt, n_total = len(seq.prompt_ids), len(seq.prompt_ids) + len(seq.response_ids)
        start = width - n_total if padding_side == "left" else 0
        span = slice(start, start + n_total)
        input_ids[row, span] = torch.tensor(seq.prompt_ids + seq.response_ids)
        attention_mask[row, span] = 1
        response_mask[row, start + n_prompt : start + n_total] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0) * attention_mask
    return SequenceBatch(input_ids, attention_mask, position_ids, response_mask)


@dataclass
class FlatSequences:
    """Sequences without padding, as flat arrays: what a shard stores to rebuild a batch.

    Sequence `i` is `tokens[offsets[i]:offsets[i+1]]`, with `response_mask` alongside.
    """

    tokens: torch.Tensor
    response_mask: torch.Tensor
    offsets: torch.Tensor

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def batch(self, rows: list[int], pad_id: int) -> SequenceBatch:
        """A right-padded batch of the given sequences."""
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in rows]
        width = max(end - start for start, end in spans)
        shape = (len(rows), width)
        input_ids = torch.full(shape, pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        response_mask = torch.zeros(shape, dtype=torch.long)
        for row, (start, end) in enumerate(spans):
            input_ids[row, : end - start] = self.tokens[start:end]
            attention_mask[row, : end - start] = 1
            response_mask[row, : end - start] = self.response_mask[start:end]
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0) * attention_mask
        return SequenceBatch(input_ids, attention_mask, position_ids, response_mask)


def flatten_batch(batch: SequenceBatch) -> FlatSequences:
    """The real tokens of each row of a (left- or right-) padded batch, padding removed."""
    keep = batch.attention_mask.bool().cpu()
    lengths = keep.sum(dim=1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return FlatSequences(batch.input_ids.cpu()[keep], batch.response_mask.cpu()[keep], offsets)
