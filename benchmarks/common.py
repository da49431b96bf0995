"""Shared pieces of the benchmarks: models, real batches, interleaved timing, peak memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GPTNeoXForCausalLM

from graddyn.data.batches import PairTokenizer
from graddyn.data.pairs import load_pairs, split_pairs
from graddyn.models import disable_dropout, load_model, load_tokenizer, tiny_neox_config


@dataclass
class Setup:
    name: str
    model: torch.nn.Module
    batch: object  # SequenceBatch of 2n rows: n chosen, then n rejected
    pair_ids: torch.Tensor


def real_batch(tokenizer, n_pairs: int, max_prompt: int, max_response: int):
    """`n_pairs` training pairs of the bundled data, padded to their longest row."""
    train, _ = split_pairs(load_pairs().pairs)
    longest = sorted(train, key=lambda p: -len(p.prompt) - len(p.chosen))[: 4 * n_pairs]
    pairs = PairTokenizer(tokenizer, longest, max_prompt, max_response)
    ids = [p.pair_id for p in longest[:n_pairs]]
    return pairs.batch(ids), torch.tensor(ids)


def setups(device: str = "cpu", dtype=torch.float32) -> list[Setup]:
    """The shipped default model and a larger config of the same architecture."""
    tokenizer = load_tokenizer("default")
    batch, ids = real_batch(tokenizer, 4, 192, 64)
    default = load_model("default", dtype=dtype, device=device)
    torch.manual_seed(0)
    larger = GPTNeoXForCausalLM(
        tiny_neox_config(
            len(tokenizer),
            hidden_size=512,
            num_hidden_layers=6,
            num_attention_heads=8,
            intermediate_size=2048,
        )
    )
    disable_dropout(larger)
    larger = larger.to(device=device, dtype=dtype).eval()
    return [
        Setup("default (6.2M)", default, batch.to(device), ids),
        Setup("larger (25M)", larger, batch.to(device), ids),
    ]


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_ratio(base: Callable, variant: Callable, pairs: int) -> tuple[float, float, float]:
    """Median, min and max of variant/base over `pairs` interleaved runs (after a warm-up)."""
    base(), variant()
    ratios = []
    for index in range(pairs):
        if index % 2:
            b, v = timed(base), timed(variant)
        else:
            v, b = timed(variant), timed(base)
        ratios.append(v / b)
    return statistics.median(ratios), min(ratios), max(ratios)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident set (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
