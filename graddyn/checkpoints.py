"""Save and load the trainable parameters of a model as safetensors (never pickle)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def readable_like_other_files(path: Path) -> None:
    """safetensors writes 0600; give checkpoints the umask's mode like every other file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_parameters(model: torch.nn.Module, path: str | Path) -> Path:
    """Write every parameter with `requires_grad` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    readable_like_other_files(tmp)
    os.replace(tmp, path)
    return path


def load_parameters(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Copy the tensors of a safetensors file into `model`'s parameters of the same name.

    Raises:
        FileNotFoundError: `path` is missing.
        ValueError: a tensor names no parameter of the model or has another shape.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    tensors = load_file(str(path))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in parameters:
                raise ValueError(f"{path}: tensor {name!r} is not a parameter of the model")
            if parameters[name].shape != value.shape:
                raise ValueError(
                    f"{path}: tensor {name!r} has shape {tuple(value.shape)}, "
                    f"the model's is {tuple(parameters[name].shape)}"
                )
            parameters[name].copy_(value)
    return list(tensors)
