"""Tokenized preference pairs and the batches the DPO loop and replay are built from.

A pair batch holds the chosen responses of its pairs in rows 0..n-1 and the rejected
ones in rows n..2n-1, so one forward pass scores both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graddyn.data.collate import (
    PaddingSide,
    SequenceBatch,
    TokenizedSequence,
    collate_sequences,
    tokenize_sequence,
)
from graddyn.data.pairs import PreferencePair


@dataclass(frozen=True)
class TokenizedPair:
    pair_id: int
    chosen: TokenizedSequence
    rejected: TokenizedSequence


class PairTokenizer:
    """Tokenizes pairs once and builds pair batches by pair id."""

    def __init__(
        self,
        tokenizer,
        pairs: list[PreferencePair],
        max_prompt_tokens: int,
        max_response_tokens: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.pairs = {pair.pair_id: pair for pair in pairs}
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self._cache: dict[int, TokenizedPair] = {}

    def __getitem__(self, pair_id: int) -> TokenizedPair:
        if pair_id not in self._cache:
            if pair_id not in self.pairs:
                raise KeyError(f"pair id {pair_id} is not in the data set")
            pair = self.pairs[pair_id]
            limits = (self.max_prompt_tokens, self.max_response_tokens)
            self._cache[pair_id] = TokenizedPair(
                pair_id,
                tokenize_sequence(self.tokenizer, pair.prompt, pair.chosen, *limits),
                tokenize_sequence(self.tokenizer, pair.prompt, pair.rejected, *limits),
            )
        return self._cache[pair_id]

    def batch(self, pair_ids: list[int], padding_side: PaddingSide = "right") -> SequenceBatch:
        """Rows: the chosen responses of `pair_ids`, then their rejected responses."""
        tokenized = [self[int(i)] for i in pair_ids]
        sequences = [t.chosen for t in tokenized] + [t.rejected for t in tokenized]
        return collate_sequences(sequences, self.pad_id, padding_side)


def effective_batches(
    pair_ids: list[int], batch_size: int, steps: int, seed: int
) -> list[list[int]]:
    """`steps` batches of `batch_size` pair ids: seeded shuffles, epoch after epoch."""
    if batch_size > len(pair_ids):
        raise ValueError(f"batch size {batch_size} exceeds the {len(pair_ids)} training pairs")
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    batches = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = [pair_ids[i] for i in torch.randperm(len(pair_ids), generator=generator)]
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches
