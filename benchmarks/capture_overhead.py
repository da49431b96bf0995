"""Cost of capture against a plain training step, measured side by side in one process.

    python benchmarks/capture_overhead.py            # CPU, about 10 minutes on 2 cores
    python benchmarks/capture_overhead.py --quick    # fewer pairs, smaller check

For each model (the shipped default and a larger config) and each capture variant, the
script runs the plain DPO forward+backward and the variant alternately (`--pairs` times,
after a warm-up) and prints the median, min and max of the pairwise time ratios, and the
peak resident memory of one variant step over that of one plain step. Then it measures
exact alignment of one checkpoint against one training step, and the fidelity of each
projection against exact inner products and cosines of per-sample gradients.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from itertools import count

import torch
from common import Setup, interleaved_ratio, peak_rss_mb, reset_peak_rss, setups
from rich.console import Console
from rich.table import Table
from torch.func import functional_call, grad, vmap

from graddyn.capture.exact import directional_logprobs, exact_attention, trainable_parameters
from graddyn.capture.projection import DenseProjector, KroneckerProjector, ProjectionSpec
from graddyn.capture.session import CaptureConfig, CaptureSession
from graddyn.logprobs import sequence_logprobs
from graddyn.losses.dpo import dpo_loss, sequence_id

console = Console(width=120)
BETA = 0.1


def reference_logps(setup: Setup) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logprobs(setup.model, setup.batch) - 1.0


def plain_step(setup: Setup, reference: torch.Tensor) -> Callable[[], None]:
    n = len(setup.pair_ids)

    def step() -> None:
        logp = sequence_logprobs(setup.model, setup.batch)
        out = dpo_loss(logp[:n], logp[n:], reference[:n], reference[n:], setup.pair_ids, BETA)
        out.loss.backward()
        setup.model.zero_grad(set_to_none=True)

    return step


def captured_step(
    setup: Setup, reference: torch.Tensor, config: CaptureConfig, write: bool = True
) -> Callable[[], None]:
    n = len(setup.pair_ids)
    run_dir = tempfile.mkdtemp(prefix="graddyn-bench-")
    session = CaptureSession(
        setup.model, run_dir, config, total_steps=None, run_attrs={"loss": "dpo", "beta": BETA}
    )
    if not write:
        session.writer.submit = lambda job: None
    rows = torch.cat([sequence_id(setup.pair_ids, 0), sequence_id(setup.pair_ids, 1)])
    steps = count()

    def step() -> None:
        session.start_step(next(steps) * config.every)
        logp = sequence_logprobs(setup.model, setup.batch)
        out = dpo_loss(logp[:n], logp[n:], reference[:n], reference[n:], setup.pair_ids, BETA)
        session.observe(out.items, out.loss, setup.batch, rows)
        out.loss.backward()
        session.end_step({"pair_ids": setup.pair_ids}, learning_rate=0.0)
        setup.model.zero_grad(set_to_none=True)

    step.session = session
    return step


def loop_step(setup: Setup, reference: torch.Tensor) -> Callable[[], None]:
    """Per-sample gradients by one forward+backward per sequence (a retained-free loop)."""
    n = len(setup.pair_ids)
    params = list(trainable_parameters(setup.model).values())

    def step() -> None:
        logp_all = []
        for row in range(2 * n):
            logp = sequence_logprobs(setup.model, setup.batch.select([row]))
            torch.autograd.grad(logp.sum(), params)
            logp_all.append(logp.detach())
        setup.model.zero_grad(set_to_none=True)

    return step


def vmap_step(setup: Setup) -> Callable[[], None]:
    """Per-sample gradients with torch.func: vmap over rows of grad of each row's log-prob.

    Transformers' attention-mask preparation branches on the mask's values, which vmap
    cannot trace, so rows are passed without a mask: with right padding the pad tokens
    come after every real token and causal attention never lets them in.
    """
    params = {k: v.detach() for k, v in trainable_parameters(setup.model).items()}
    batch = setup.batch

    def row_logp(p, ids, response):
        out = functional_call(setup.model, p, kwargs=dict(input_ids=ids[None], use_cache=False))
        logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
        picked = logp.gather(-1, ids[1:, None])[:, 0]
        return (picked * response[1:]).sum()

    per_sample = vmap(grad(row_logp), in_dims=(None, 0, 0))

    def step() -> None:
        with warnings.catch_warnings(), exact_attention():
            warnings.simplefilter("ignore")
            per_sample(params, batch.input_ids, batch.response_mask.float())

    return step


def replay_step(setup: Setup, reference: torch.Tensor) -> Callable[[], None]:
    """Exact alignment of one checkpoint, given g': one forward-mode pass over the batch for
    every δ_i, and one reverse pass of the actual loss for the whole G."""
    n = len(setup.pair_ids)
    params = trainable_parameters(setup.model)
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def step() -> None:
        directional_logprobs(setup.model, setup.batch, direction)
        with exact_attention():
            logp = sequence_logprobs(setup.model, setup.batch)
            out = dpo_loss(logp[:n], logp[n:], reference[:n], reference[n:], setup.pair_ids, BETA)
            torch.autograd.grad(out.loss, list(params.values()))

    return step


def peak_growth_mb(step: Callable, warm: Callable) -> float:
    """Peak resident memory growth during one call of `step`, after `warm` has run once
    (so that allocator caches and one-time buffers are in place for both)."""
    warm()
    step()
    reset_peak_rss()
    start = peak_rss_mb()
    step()
    return peak_rss_mb() - start


def child_memory(model_index: int, variant: str) -> float:
    """Run in a fresh process: the peak growth of one step of `variant` ("plain" or a
    variant name) on setup `model_index`."""
    setup = setups()[model_index]
    reference = reference_logps(setup)
    base = plain_step(setup, reference)
    measured = variants(setup, reference)
    step = base if variant == "plain" else measured[variant]
    growth = peak_growth_mb(step, base)
    for candidate in measured.values():
        if hasattr(candidate, "session"):
            candidate.session.close()
    return growth


def memory_ratios(model_index: int, names: list[str]) -> dict[str, float]:
    """Peak memory of each variant's step over the plain step's, each in its own process."""

    def measure(variant: str) -> float:
        completed = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(model_index), variant],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(completed.stdout.strip().splitlines()[-1])

    plain = measure("plain")
    return {name: measure(name) / max(plain, 1.0) for name in names}


def variants(setup: Setup, reference: torch.Tensor) -> dict[str, Callable]:
    kron = ProjectionSpec(kind="kronecker", seed=0, k_in=16, k_out=16)
    out_projection = (_last_layer_prefix(setup.model) + "attention.dense.",)
    dense = ProjectionSpec(kind="dense", seed=0, k_out=1024)
    quiet = dict(checkpoints=False, every=1)
    return {
        "aggregated only (items, no per-sample)": captured_step(
            setup, reference, CaptureConfig(per_sequence=False, **quiet)
        ),
        "projected per-sample, Kronecker 16x16": captured_step(
            setup, reference, CaptureConfig(projection=kron, **quiet)
        ),
        "projected per-sample, dense k=1024 (one attention output layer)": captured_step(
            setup, reference, CaptureConfig(projection=dense, scope=out_projection, **quiet)
        ),
        "exact per-sample norms": captured_step(
            setup, reference, CaptureConfig(per_sequence=False, exact_norms=True, **quiet)
        ),
        "exact per-sample gradients (explicit, not written)": captured_step(
            setup,
            reference,
            CaptureConfig(per_sequence=False, explicit_gradients=True, **quiet),
            write=False,
        ),
        "full capture (Kronecker + checkpoint + writer)": captured_step(
            setup, reference, CaptureConfig(projection=kron, every=1)
        ),
        "reference: per-sample autograd loop": loop_step(setup, reference),
        "reference: torch.func vmap": vmap_step(setup),
    }


def _last_layer_prefix(model) -> str:
    name, layers = next(
        (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)
    )
    return f"{name}.{len(layers) - 1}."


def overhead_table(setup: Setup, model_index: int, pairs: int) -> Table:
    reference = reference_logps(setup)
    base = plain_step(setup, reference)
    measured = variants(setup, reference)
    memory = memory_ratios(model_index, list(measured))
    table = Table(
        title=f"{setup.name}: {tuple(setup.batch.input_ids.shape)} tokens, "
        f"ratios to a plain DPO forward+backward ({pairs} interleaved pairs)"
    )
    for column in ("variant", "time ratio (median)", "min-max", "peak memory ratio"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    with_writer = None
    for name, variant in measured.items():
        median, low, high = interleaved_ratio(base, variant, pairs)
        table.add_row(name, f"{median:.2f}x", f"{low:.2f}-{high:.2f}", f"{memory[name]:.2f}x")
        if name.startswith("projected per-sample, Kronecker"):
            with_writer = variant.session.config
    on = captured_step(setup, reference, with_writer, write=True)
    off = captured_step(setup, reference, with_writer, write=False)
    median, low, high = interleaved_ratio(off, on, pairs)
    table.add_row(
        "writer on vs off (Kronecker capture)", f"{median:.2f}x", f"{low:.2f}-{high:.2f}", ""
    )
    median, low, high = interleaved_ratio(base, replay_step(setup, reference), pairs)
    table.add_row(
        "exact alignment of one checkpoint (all parts)",
        f"{median:.2f}x",
        f"{low:.2f}-{high:.2f}",
        "",
    )
    return table


def target_gradient_cost(setup: Setup, pairs: int) -> str:
    """One backward pass over 64 targets of 64 tokens, against one training step."""
    reference = reference_logps(setup)
    base = plain_step(setup, reference)
    targets = setup.batch.select(list(range(setup.batch.input_ids.shape[0])))

    def backward_over_targets() -> None:
        with exact_attention():
            for _ in range(64 // targets.input_ids.shape[0]):
                sequence_logprobs(setup.model, targets).sum().backward()
        setup.model.zero_grad(set_to_none=True)

    median, low, high = interleaved_ratio(base, backward_over_targets, max(3, pairs // 2))
    return (
        f"{setup.name}: backward over 64 targets (g') = {median:.2f}x a step "
        f"({low:.2f}-{high:.2f})"
    )


def fidelity_table(setup: Setup) -> Table:
    """Projected inner products and cosines of per-sample gradients against exact ones."""
    from graddyn.capture.hooks import Collect, LayerHooks

    names = set(trainable_parameters(setup.model))
    hooks = LayerHooks(setup.model, ProjectionSpec(), names)
    hooks.collect = Collect(projected=False, explicit=True)
    hooks.arm()
    sequence_logprobs(setup.model, setup.batch).sum().backward()
    hooks.disarm()
    setup.model.zero_grad(set_to_none=True)
    exact = hooks.flat_explicit().double()
    order = [slot.name for slot in hooks.layout]
    shapes = {slot.name: slot.shape for slot in hooks.layout}
    table = Table(
        title=f"{setup.name}: projection fidelity on {exact.shape[0]} per-sample "
        "gradients (all pairs i<j)"
    )
    for column in (
        "projection",
        "dims",
        "median |rel. error| of <gi,gj>",
        "median |cos error|",
        "exact |cos| median",
    ):
        table.add_column(column, justify="left" if column == "projection" else "right")
    for k in (8, 16, 32):
        projector = KroneckerProjector(ProjectionSpec(seed=0, k_in=k, k_out=k))
        rows = torch.stack([_kron_row(projector, order, shapes, g) for g in exact])
        table.add_row(
            f"Kronecker {k}x{k} per parameter", str(rows.shape[1]), *_errors(exact, rows)
        )
    subset = [
        i for i, name in enumerate(order) if name.startswith(_last_layer_prefix(setup.model))
    ]
    columns = torch.cat([_slot_columns(hooks.layout, i) for i in subset])
    exact_subset = exact[:, columns]
    for k in (1024, 4096):
        spec = ProjectionSpec(kind="dense", seed=0, k_out=k)
        rows = (
            DenseProjector(spec, exact_subset.shape[1], block_rows=128)
            .project(exact_subset.float())
            .double()
        )
        table.add_row(f"dense JL, k={k} (last layer only)", str(k), *_errors(exact_subset, rows))
    return table


def _slot_columns(layout, index: int) -> torch.Tensor:
    """Columns of the flat explicit gradient that hold parameter `layout[index]`."""
    start = sum(int(torch.tensor(slot.shape).prod()) for slot in layout[:index])
    return torch.arange(start, start + int(torch.tensor(layout[index].shape).prod()))


def _kron_row(projector, order, shapes, flat) -> torch.Tensor:
    parts, offset = [], 0
    for name in order:
        size = int(torch.tensor(shapes[name]).prod())
        parts.append(
            projector.project_parameter(
                name, flat[offset : offset + size].reshape(shapes[name]).float()
            )
        )
        offset += size
    return torch.cat(parts).double()


def _errors(exact: torch.Tensor, projected: torch.Tensor) -> tuple[str, str, str]:
    i, j = torch.triu_indices(exact.shape[0], exact.shape[0], offset=1)
    true = (exact[i] * exact[j]).sum(1)
    approx = (projected[i] * projected[j]).sum(1)
    true_cos = true / (exact[i].norm(dim=1) * exact[j].norm(dim=1))
    approx_cos = approx / (projected[i].norm(dim=1) * projected[j].norm(dim=1))
    rel = ((approx - true).abs() / true.abs()).median().item()
    cos_err = (approx_cos - true_cos).abs().median().item()
    return f"{rel:.2f}", f"{cos_err:.3f}", f"{true_cos.abs().median().item():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=7, help="interleaved pairs per ratio")
    parser.add_argument("--quick", action="store_true", help="3 pairs, default model only")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_child:
        print(child_memory(int(args.memory_child[0]), args.memory_child[1]))
        return
    pairs = 3 if args.quick else args.pairs
    torch.manual_seed(0)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    chosen = setups()[:1] if args.quick else setups()
    for index, setup in enumerate(chosen):
        console.print(overhead_table(setup, index, pairs))
        console.print(target_gradient_cost(setup, pairs))
    console.print(fidelity_table(chosen[0]))
    console.print(
        "ratios: median of pairwise (variant / plain) times; memory: peak RSS "
        "growth during one step, variant over plain"
    )


if __name__ == "__main__":
    main()
