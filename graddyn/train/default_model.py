"""Build the shipped default model: tokenizer, language-modelling stage, SFT stage.

`graddyn build-default` runs this. It reads only the training split of the bundled pairs
(the same split every other stage uses), so held-out prompts stay unseen.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GPTNeoXForCausalLM

from graddyn import __version__
from graddyn.data.collate import tokenize_sequence
from graddyn.data.pairs import load_pairs, split_pairs
from graddyn.models import tiny_neox_config
from graddyn.train.sft import SFTConfig, as_full_sequence, train_sft
from graddyn.train.tokenizer import train_bpe_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class DefaultModelRecipe:
    """Everything that determines the shipped default model."""

    vocab_size: int = 6000
    max_prompt_tokens: int = 192
    max_response_tokens: int = 64
    lm_epochs: float = 2.0
    sft_epochs: float = 2.0
    batch_size: int = 16
    learning_rate: float = 1e-3
    held_out_fraction: float = 0.1
    split_seed: int = 0
    seed: int = 0


def build_default_model(
    out_dir: str | Path,
    recipe: DefaultModelRecipe | None = None,
    pairs_path: str | None = None,
    on_step: Callable[[str, int, int, float], None] | None = None,
) -> dict:
    """Train the default tokenizer and model and save them to `out_dir`; returns the report."""
    recipe = recipe or DefaultModelRecipe()
    out_dir = Path(out_dir)
    started = time.time()
    torch.manual_seed(recipe.seed)
    train, _ = split_pairs(
        load_pairs(pairs_path).pairs, recipe.held_out_fraction, recipe.split_seed
    )

    texts = [text for pair in train for text in (pair.prompt + pair.chosen, pair.rejected)]
    tokenizer = train_bpe_tokenizer(texts, recipe.vocab_size)
    eos = tokenizer.eos_token_id
    chosen = [
        tokenize_sequence(
            tokenizer,
            pair.prompt,
            pair.chosen,
            recipe.max_prompt_tokens,
            recipe.max_response_tokens,
        )
        for pair in train
    ]
    config = tiny_neox_config(len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = GPTNeoXForCausalLM(config)

    stages = {
        "language_modelling": ([as_full_sequence(s) for s in chosen], recipe.lm_epochs),
        "sft": (chosen, recipe.sft_epochs),
    }
    report: dict = {"recipe": asdict(recipe), "graddyn_version": __version__, "stages": {}}
    for stage, (sequences, epochs) in stages.items():
        sft_config = SFTConfig(
            epochs=epochs,
            batch_size=recipe.batch_size,
            learning_rate=recipe.learning_rate,
            seed=recipe.seed,
        )
        callback = (
            (lambda s, n, loss, stage=stage: on_step(stage, s, n, loss)) if on_step else None
        )
        model.train()
        losses = train_sft(model, sequences, eos, sft_config, callback)
        report["stages"][stage] = {
            "steps": len(losses),
            "first_loss": losses[0],
            "last_loss": sum(losses[-20:]) / len(losses[-20:]),
        }
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["seconds"] = round(time.time() - started, 1)
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
