"""The `graddyn` command line: parse options, call the library, render with rich.

Every command is a thin wrapper; the work lives in the library so that the same stages
run from a user's own script.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from graddyn import __version__
from graddyn.cli.progress import console, error_console, setup_logging, stage

logger = logging.getLogger("graddyn.cli")

app = typer.Typer(
    name="graddyn",
    help="Capture and analyse what a preference-optimization run pulls a model towards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RunDir = Annotated[Path, typer.Argument(help="Run directory written by `graddyn capture`.")]
Model = Annotated[
    str,
    typer.Option(
        help="Hugging Face causal LM: hub name, local path, or default (the shipped model)."
    ),
]
Device = Annotated[str, typer.Option(help="torch device, e.g. cpu, cuda, cuda:1.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"graddyn {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """graddyn: gradient alignment and decomposition of DPO runs."""
    setup_logging(verbose)


@app.command()
def capture(
    run_dir: Annotated[Path, typer.Option(help="Where shards and checkpoints go.")] = Path(
        "runs/dpo"
    ),
    model: Model = "default",
    data: Annotated[
        str | None,
        typer.Option(
            help="Preference pairs (.jsonl or .jsonl.gz, HH-RLHF or prompt/chosen/rejected); "
            "default: the bundled HH-RLHF harmless-base test file."
        ),
    ] = None,
    algo: Annotated[str, typer.Option(help="dpo or ppo.")] = "dpo",
    steps: Annotated[
        int, typer.Option(help="Optimizer steps (PPO: rollout updates).", min=1)
    ] = 60,
    batch_size: Annotated[
        int, typer.Option(help="Pairs per effective batch (PPO: prompts per rollout).", min=1)
    ] = 8,
    grad_accumulation: Annotated[int, typer.Option(help="Micro-batches per step.", min=1)] = 1,
    beta: Annotated[float, typer.Option(help="DPO temperature β.")] = 0.1,
    learning_rate: Annotated[
        float | None, typer.Option(help="AdamW learning rate (default: 1e-4 DPO, 2e-5 PPO).")
    ] = None,
    reward_model: Annotated[
        str, typer.Option(help="PPO reward model: a folder, or default (the shipped one).")
    ] = "default",
    max_prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens kept (last).")] = 128,
    max_response_tokens: Annotated[int, typer.Option(help="Response tokens kept.")] = 64,
    capture_every: Annotated[
        int, typer.Option(help="Capture every N steps (and the last).", min=1)
    ] = 10,
    projection_dim: Annotated[
        int, typer.Option(help="k of the Kronecker projection, per side (k x k per layer).", min=1)
    ] = 16,
    projection_seed: Annotated[int, typer.Option(help="Seed of the projection.")] = 0,
    full_aggregates: Annotated[
        bool, typer.Option(help="Also store unprojected per-component aggregated gradients.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of batching and initialisation.")] = 0,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or float64.")] = "float32",
    device: Device = "cpu",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier run in --run-dir.")
    ] = False,
) -> None:
    """Train with DPO or PPO on the preference data and capture gradients into --run-dir."""
    from graddyn.capture.projection import ProjectionSpec
    from graddyn.train.dpo import DPOConfig
    from graddyn.train.ppo import PPOConfig

    projection = ProjectionSpec(seed=projection_seed, k_in=projection_dim, k_out=projection_dim)
    if algo == "ppo":
        config = PPOConfig(
            model=model,
            reward_model=reward_model,
            data=data,
            updates=steps,
            rollout_size=batch_size,
            learning_rate=learning_rate or 2e-5,
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_response_tokens,
            capture_every=capture_every,
            seed=seed,
            dtype=dtype,
            device=device,
            projection=projection,
        )
        _run_ppo(config, run_dir, overwrite)
        return
    if algo != "dpo":
        raise ValueError(f"--algo must be dpo or ppo, got {algo!r}")
    config = DPOConfig(
        model=model,
        data=data,
        steps=steps,
        batch_size=batch_size,
        grad_accumulation=grad_accumulation,
        beta=beta,
        learning_rate=learning_rate or 1e-4,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        capture_every=capture_every,
        seed=seed,
        dtype=dtype,
        device=device,
        projection=projection,
        full_aggregates=full_aggregates,
    )
    _run_capture(config, run_dir, overwrite)


def _run_ppo(config, run_dir: Path, overwrite: bool = False) -> None:
    from graddyn.train.ppo import train_ppo

    with stage("PPO training", config.updates) as advance:

        def on_update(update: int, metrics: dict) -> None:
            note = (
                f"reward {metrics['reward/mean']:+.3f} kl {metrics['kl/mean']:.3f} "
                f"clip {metrics['clip_fraction']:.2f}"
            )
            advance(update + 1, note=note)

        train_ppo(config, run_dir, on_update, overwrite)
    console.print(f"captured run: {run_dir}")


def _run_capture(config, run_dir: Path, overwrite: bool = False) -> None:
    from graddyn.train.dpo import train_dpo

    with stage("DPO training", config.steps) as advance:

        def on_step(step: int, metrics: dict) -> None:
            note = (
                f"loss {metrics['loss']:.4f} acc {metrics['rewards/accuracies']:.2f} "
                f"margin {metrics['rewards/margins']:+.3f}"
            )
            advance(step + 1, note=note)

        train_dpo(config, run_dir, on_step, overwrite)
    console.print(f"captured run: {run_dir}")


@app.command()
def targets(
    run_dir: RunDir,
    prompts: Annotated[int, typer.Option(help="Held-out prompts in the targets D′.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per response.", min=1)] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the prompt draw.")] = 0,
    device: Device = "cpu",
) -> None:
    """Build the targets D′: greedy responses of the final model to held-out prompts."""
    from graddyn.targets import build_targets

    with stage("targets D'", prompts) as advance:
        target_set = build_targets(
            run_dir,
            prompts,
            max_new_tokens,
            seed,
            device,
            on_batch=lambda done, total: advance(done, total),
        )
    console.print(f"{len(target_set)} targets: {run_dir / 'targets.h5'}")


@app.command()
def replay(
    run_dir: RunDir,
    dtype: Annotated[str, typer.Option(help="Precision of the exact replay.")] = "float32",
    device: Device = "cpu",
    chunk_size: Annotated[int, typer.Option(help="Pairs or targets per pass.", min=1)] = 8,
) -> None:
    """Replay every checkpoint and compute the exact alignment G of every part."""
    from graddyn.replay import replay_run

    with stage("exact alignment") as advance:
        path = replay_run(
            run_dir,
            dtype,
            device,
            chunk_size,
            on_checkpoint=lambda done, total: advance(done, total),
        )
    console.print(f"alignment: {path}")


@app.command()
def analyze(
    run_dir: RunDir,
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default RUN_DIR/report).")
    ] = None,
    per_checkpoint: Annotated[
        bool, typer.Option(help="Also print G at every checkpoint.")
    ] = False,
) -> None:
    """Print the alignment table and write the figure and JSON summary."""
    from graddyn.report.summary import analyze_run

    report = analyze_run(run_dir, out)
    for renderable in report.renderables(per_checkpoint=per_checkpoint):
        console.print(renderable)


@app.command()
def demo(
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Run directory of the demo (default runs/demo, runs/demo-ppo)."),
    ] = None,
    algo: Annotated[str, typer.Option(help="dpo or ppo.")] = "dpo",
    steps: Annotated[
        int | None, typer.Option(help="DPO steps (default 150) or PPO updates (default 40).")
    ] = None,
    capture_every: Annotated[
        int | None, typer.Option(help="Capture interval (default 10 DPO, 4 PPO).")
    ] = None,
    prompts: Annotated[int, typer.Option(help="Prompts in the targets D′.", min=1)] = 64,
    device: Device = "cpu",
) -> None:
    """Run every stage on the shipped default models and the bundled data (an earlier
    demo in the same run directory is replaced)."""
    from graddyn.train.dpo import DPOConfig
    from graddyn.train.ppo import PPOConfig
    from graddyn.train.ppo_eval import evaluate_ppo_run

    started = time.time()
    if algo == "ppo":
        run_dir = run_dir or Path("runs/demo-ppo")
        _run_ppo(
            PPOConfig(updates=steps or 40, capture_every=capture_every or 4, device=device),
            run_dir,
            overwrite=True,
        )
    elif algo == "dpo":
        run_dir = run_dir or Path("runs/demo")
        _run_capture(
            DPOConfig(steps=steps or 150, capture_every=capture_every or 10, device=device),
            run_dir,
            overwrite=True,
        )
    else:
        raise ValueError(f"--algo must be dpo or ppo, got {algo!r}")
    targets(run_dir, prompts=prompts, max_new_tokens=64, seed=0, device=device)
    replay(run_dir, dtype="float32", device=device, chunk_size=8)
    analyze(run_dir, out=None, per_checkpoint=False)
    if algo == "ppo":
        _print_ppo_evaluation(evaluate_ppo_run(run_dir))
    console.print(f"demo finished in {time.time() - started:.0f} s; report: {run_dir / 'report'}")


def _print_ppo_evaluation(result: dict) -> None:
    before, after = result["reward_before"], result["reward_after"]
    console.print(
        f"held-out reward of greedy responses ({before['n']} prompts): before "
        f"{before['mean']:+.3f} [{before['ci95'][0]:+.3f}, {before['ci95'][1]:+.3f}], after "
        f"{after['mean']:+.3f} [{after['ci95'][0]:+.3f}, {after['ci95'][1]:+.3f}] (95% CI)"
    )
    judge = result.get("reward_model_held_out")
    if judge:
        low, high = judge["accuracy_ci"]
        console.print(
            f"reward model's held-out pair accuracy: {judge['accuracy']:.3f} "
            f"[{low:.3f}, {high:.3f}]; {result['note']}"
        )


@app.command("build-reward-model")
def build_reward_model(
    out: Annotated[
        Path | None, typer.Option(help="Folder (default: the one inside the package).")
    ] = None,
) -> None:
    """Rebuild the shipped reward model (Bradley-Terry, from the SFT default model)."""
    from graddyn.reward import default_reward_model_path
    from graddyn.train.reward import RewardConfig, build_default_reward_model

    with stage("reward model") as advance:
        report = build_default_reward_model(
            out or default_reward_model_path(),
            RewardConfig(),
            on_step=lambda step, total, m: advance(step + 1, total, f"loss {m['loss']:.3f}"),
        )
    console.print_json(json.dumps(report))


@app.command("check-data")
def check_data(
    path: Annotated[
        Path | None, typer.Argument(help="Preference file (default: bundled).")
    ] = None,
) -> None:
    """Read a preference file and report the pairs kept and the rows skipped, and why."""
    from graddyn.data.pairs import load_pairs

    pair_file = load_pairs(path)
    console.print(
        f"{pair_file.path}: {len(pair_file.pairs)} pairs, {len(pair_file.skipped)} skipped"
    )
    for reason, count in sorted(pair_file.skipped_by_reason().items()):
        lines = [r.line for r in pair_file.skipped if r.reason == reason][:5]
        console.print(
            f"  {count:5d}  {reason} (lines {', '.join(map(str, lines))}"
            f"{', ...' if count > 5 else ''})"
        )


@app.command("build-default")
def build_default(
    out: Annotated[
        Path | None, typer.Option(help="Folder (default: the one inside the package).")
    ] = None,
) -> None:
    """Rebuild the shipped default model: tokenizer, language modelling, then SFT."""
    from graddyn.models import default_model_path
    from graddyn.train.default_model import DefaultModelRecipe, build_default_model

    recipe = DefaultModelRecipe()
    with stage("default model") as advance:
        report = build_default_model(
            out or default_model_path(),
            recipe,
            on_step=lambda name, step, total, loss: advance(
                step + 1, total, f"{name} loss {loss:.3f}"
            ),
        )
    console.print_json(json.dumps(report))


def main() -> None:
    """Console-script entry point: one-line errors for what a user can cause."""
    try:
        app()
    except (FileNotFoundError, ValueError, KeyError, OSError) as error:
        error_console.print(f"[red]error:[/red] {error}", markup=True, highlight=False)
        sys.exit(2)
