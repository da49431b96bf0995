"""The target set D': by default the final model's greedy responses to held-out prompts.

D' is stored as token ids (never text) in `targets.h5` of the run directory: the prompts
and responses as flat arrays with offsets. A generated EOS is kept as the response's last
token; a response that reaches `max_new_tokens` without EOS has none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graddyn.checkpoints import load_parameters
from graddyn.data.collate import TokenizedSequence, collate_sequences, tokenize_sequence
from graddyn.data.pairs import PreferencePair, load_pairs, split_pairs
from graddyn.models import load_model, load_tokenizer
from graddyn.store.manifest import read_manifest
from graddyn.store.shard import ShardRecord, read_shard, write_shard

logger = logging.getLogger(__name__)

TARGETS_FILE = "targets.h5"


@dataclass
class TargetSet:
    """Target sequences with the ids of the pairs whose prompts they answer."""

    sequences: list[TokenizedSequence]
    pair_ids: list[int]
    description: str

    def __len__(self) -> int:
        return len(self.sequences)


def choose_prompts(
    held_out: list[PreferencePair], n_prompts: int, seed: int
) -> list[PreferencePair]:
    """`n_prompts` held-out pairs drawn with a fixed seed, in id order."""
    generator = np.random.Generator(np.random.PCG64(seed))
    n = min(n_prompts, len(held_out))
    chosen = sorted(generator.choice(len(held_out), size=n, replace=False).tolist())
    return [held_out[i] for i in chosen]


@torch.no_grad()
def generate_final_responses(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[PreferencePair],
    max_prompt_tokens: int,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
) -> TargetSet:
    """Greedy responses of `model` to the prompts of `prompts`, as token ids."""
    eos = tokenizer.eos_token_id
    sequences: list[TokenizedSequence] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        prompt_only = [
            tokenize_sequence(tokenizer, p.prompt, "", max_prompt_tokens, 0, append_eos=False)
            for p in chunk
        ]
        batch = collate_sequences(prompt_only, tokenizer.pad_token_id, "left").to(device)
        output = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        width = batch.input_ids.shape[1]
        for row, seq in enumerate(prompt_only):
            sequences.append(
                TokenizedSequence(seq.prompt_ids, cut_at_eos(output[row, width:].tolist(), eos))
            )
        if on_batch is not None:
            on_batch(min(start + batch_size, len(prompts)), len(prompts))
    description = (
        f"greedy responses of the final model to {len(prompts)} held-out prompts, "
        f"at most {max_new_tokens} new tokens, stopping at EOS"
    )
    return TargetSet(sequences, [p.pair_id for p in prompts], description)


def cut_at_eos(tokens: list[int], eos: int) -> list[int]:
    """Tokens up to and including the first EOS (everything after is padding)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def save_targets(run_dir: str | Path, targets: TargetSet) -> Path:
    prompts = [s.prompt_ids for s in targets.sequences]
    responses = [s.response_ids for s in targets.sequences]
    empty = [i for i, r in enumerate(responses) if not r]
    if empty:
        raise ValueError(f"target {empty[0]} has an empty response")
    record = ShardRecord(
        step=-1,
        attrs={"description": targets.description, "kind": "final_responses"},
        arrays={
            "pair_ids": np.array(targets.pair_ids, dtype=np.int64),
            "prompt_tokens": np.concatenate([np.array(p, np.int64) for p in prompts]),
            "prompt_offsets": np.cumsum([0] + [len(p) for p in prompts]),
            "response_tokens": np.concatenate([np.array(r, np.int64) for r in responses]),
            "response_offsets": np.cumsum([0] + [len(r) for r in responses]),
        },
    )
    return write_shard(Path(run_dir) / TARGETS_FILE, record)


def load_targets(run_dir: str | Path) -> TargetSet:
    path = Path(run_dir) / TARGETS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no targets; run `graddyn targets RUN_DIR` first")
    shard = read_shard(path)
    a = shard.arrays
    sequences = [
        TokenizedSequence(
            a["prompt_tokens"][a["prompt_offsets"][i] : a["prompt_offsets"][i + 1]].tolist(),
            a["response_tokens"][a["response_offsets"][i] : a["response_offsets"][i + 1]].tolist(),
        )
        for i in range(len(a["pair_ids"]))
    ]
    return TargetSet(sequences, a["pair_ids"].tolist(), shard.attrs["description"])


def build_targets(
    run_dir: str | Path,
    n_prompts: int = 64,
    max_new_tokens: int = 64,
    seed: int = 0,
    device: str = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
) -> TargetSet:
    """Generate D' from the run's final model and save it to `run_dir/targets.h5`."""
    run_dir = Path(run_dir)
    run = read_manifest(run_dir)["run"]
    tokenizer = load_tokenizer(run["model"])
    model = load_model(run["model"], "float32", device)
    load_parameters(model, run_dir / "checkpoints" / "final.safetensors")
    _, held_out = split_pairs(
        load_pairs(run["data"]).pairs, run["held_out_fraction"], run["split_seed"]
    )
    prompts = choose_prompts(held_out, n_prompts, seed)
    targets = generate_final_responses(
        model, tokenizer, prompts, run["max_prompt_tokens"], max_new_tokens, on_batch=on_batch
    )
    save_targets(run_dir, targets)
    return targets
