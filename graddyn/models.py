"""Load a causal LM and its tokenizer: the shipped default, or any Hugging Face model.

The default is a small GPT-NeoX (Pythia architecture) with a byte-level BPE tokenizer,
both trained on the bundled HH-RLHF pairs (`graddyn build-default` rebuilds it). Any other
causal LM is loaded by hub name or local path through `transformers`, on the same path.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def default_model_path() -> Path:
    """Folder of the shipped default model (config, safetensors weights, tokenizer)."""
    return Path(str(resources.files("graddyn") / "assets" / "default_model"))


def resolve_model_path(name_or_path: str) -> str:
    """`"default"` names the shipped model; anything else is passed to transformers."""
    if name_or_path == DEFAULT_MODEL:
        path = default_model_path()
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(
                f"{path}: the shipped default model is missing; rebuild it with "
                "`graddyn build-default`"
            )
        return str(path)
    local = name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()
    if local and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"{name_or_path}: no such model folder")
    return name_or_path


def check_device(device: str | torch.device) -> None:
    """A one-line error for a device this torch cannot use (e.g. CUDA on a CPU build)."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available to this torch build")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available")


def parse_dtype(name: str) -> torch.dtype:
    """torch dtype from its name, with a one-line error listing the accepted names."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """Tokenizer of a model; one without a pad token pads with EOS (masks come from lengths)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """A causal LM by hub name, local path or `"default"`, in `dtype` on `device`.

    Dropout is set to zero at load (preference losses compare log-probs of the same
    sequence under two models, and captures must repeat bitwise); the model is returned
    in eval mode, which the training loops keep.
    """
    check_device(device)
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    disable_dropout(model)
    return model.to(device).eval()


def disable_dropout(model: torch.nn.Module) -> list[str]:
    """Set every dropout probability in `model` to zero; returns the modules changed."""
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed.append(name)
    config = getattr(model, "config", None)
    for key in (
        "attention_dropout",
        "hidden_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "dropout",
    ):
        if config is not None and getattr(config, key, 0):
            setattr(config, key, 0.0)
    if changed:
        logger.info("dropout disabled in %d modules", len(changed))
    return changed


def tiny_neox_config(vocab_size: int, **overrides) -> GPTNeoXConfig:
    """A small GPT-NeoX config (the default model's shape unless overridden)."""
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=512,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        use_cache=True,
    )
    settings.update(overrides)
    return GPTNeoXConfig(**settings)
