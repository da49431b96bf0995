"""The capture benchmark on a CUDA device: bf16, a Pythia-410m-sized GPT-NeoX.

    python benchmarks/capture_overhead_cuda.py

Skipped (exit 0, with a message) when no CUDA device is present. Times are interleaved
A/B pairs as in `capture_overhead.py`; memory is `torch.cuda.max_memory_allocated`
during one step, variant over plain.
"""

from __future__ import annotations

import argparse

import torch
from capture_overhead import plain_step, reference_logps, replay_step, variants
from common import Setup, interleaved_ratio, real_batch
from rich.console import Console
from rich.table import Table
from transformers import GPTNeoXForCausalLM

from graddyn.models import disable_dropout, load_tokenizer, tiny_neox_config

console = Console(width=120)


def pythia_410m_sized(device: str) -> Setup:
    tokenizer = load_tokenizer("default")
    config = tiny_neox_config(
        50304,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    disable_dropout(model)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    batch, ids = real_batch(tokenizer, 4, 448, 64)
    return Setup("Pythia-410m-sized, bf16", model, batch.to(device), ids)


def peak_ratio_cuda(base, variant) -> float:
    peaks = []
    for fn in (base, variant):
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
    return peaks[1] / max(peaks[0], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=7)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        console.print("no CUDA device: the CUDA benchmark is skipped")
        return
    setup = pythia_410m_sized("cuda")
    reference = reference_logps(setup)
    base = plain_step(setup, reference)
    table = Table(
        title=f"{setup.name} on {torch.cuda.get_device_name()}: "
        f"{tuple(setup.batch.input_ids.shape)} tokens"
    )
    for column in ("variant", "time ratio (median)", "min-max", "peak memory ratio"):
        table.add_column(column)
    measured = variants(setup, reference)
    measured["exact alignment of one checkpoint"] = replay_step(setup, reference)
    for name, variant in measured.items():
        if "autograd loop" in name:
            continue
        median, low, high = interleaved_ratio(base, variant, args.pairs)
        table.add_row(
            name,
            f"{median:.2f}x",
            f"{low:.2f}-{high:.2f}",
            f"{peak_ratio_cuda(base, variant):.2f}x",
        )
    console.print(table)


if __name__ == "__main__":
    main()
