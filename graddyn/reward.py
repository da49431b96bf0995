"""A Bradley-Terry reward model: a causal-LM backbone with a scalar head on the last real token.

This is the judge of the evaluation without a hosted judge (section 6 of the method): it
scores a prompt and response with one number, read from the hidden state of the last real
token of the row (the EOS that ends a complete response, or the last token kept when the
response was truncated). Padding on either side never moves that token.

A saved reward model is a Hugging Face base-model folder (config, safetensors weights,
tokenizer) plus `reward_head.safetensors` and `reward_config.json`; nothing is pickled.
`graddyn build-reward-model` builds the shipped one from the default SFT model.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from graddyn import __version__
from graddyn.data.collate import SequenceBatch
from graddyn.models import DEFAULT_MODEL, disable_dropout, load_tokenizer, parse_dtype
from graddyn.models import resolve_model_path as resolve_base_model_path

logger = logging.getLogger(__name__)

REWARD_HEAD_FILE = "reward_head.safetensors"
REWARD_CONFIG_FILE = "reward_config.json"
REWARD_FORMAT = "graddyn-reward-model"


def default_reward_model_path() -> Path:
    """Folder of the shipped default reward model (backbone, tokenizer, head, config)."""
    return Path(str(resources.files("graddyn") / "assets" / "default_reward_model"))


def last_real_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position with `attention_mask == 1` in each row.

    Correct for left padding, right padding and unpadded rows alike, since it reads the
    mask, never the token ids (the pad id is often the EOS id).

    Raises:
        ValueError: a row has no real token at all.
    """
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} of the batch have no real token to score")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)


class RewardModel(torch.nn.Module):
    """A causal-LM backbone without its LM head, and a linear head to one scalar.

    Args:
        backbone: a Hugging Face base model (`AutoModel`) whose output has
            `last_hidden_state`.
        head: a `Linear(hidden, 1)`; a new one, seeded by `seed`, when omitted.
        base_model: name or path the backbone came from, recorded when saving.
        seed: seed of a new head's initialisation (normal, std = the backbone's
            `initializer_range`, zero bias); the global RNG is left untouched.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        head: torch.nn.Linear | None = None,
        base_model: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        hidden = backbone.config.hidden_size
        if head is None:
            head = torch.nn.Linear(hidden, 1)
            std = getattr(backbone.config, "initializer_range", 0.02)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                head.weight.copy_(torch.randn(1, hidden, generator=generator) * std)
                head.bias.zero_()
        if tuple(head.weight.shape) != (1, hidden):
            raise ValueError(
                f"the reward head has shape {tuple(head.weight.shape)}; the backbone's "
                f"hidden size {hidden} needs (1, {hidden})"
            )
        weight = next(backbone.parameters())
        self.backbone = backbone
        self.head = head.to(device=weight.device, dtype=weight.dtype)
        self.base_model = base_model

    @classmethod
    def from_base(
        cls,
        name_or_path: str = DEFAULT_MODEL,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> RewardModel:
        """A new reward model on a causal LM by hub name, local path or `"default"`.

        The LM head of the checkpoint is not loaded (transformers reports its weights as
        unexpected); dropout is set to zero and the model is returned in eval mode.
        """
        torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        backbone = AutoModel.from_pretrained(
            resolve_base_model_path(name_or_path), dtype=torch_dtype
        )
        disable_dropout(backbone)
        model = cls(backbone.to(device), base_model=name_or_path, seed=seed)
        return model.eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B,) reward of each row, read at its last real token."""
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        last = last_real_token(attention_mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(picked).squeeze(-1)

    def token_values(self, batch: SequenceBatch) -> torch.Tensor:
        """(B, T) the head at every position, aligned like `response_token_logprobs`:
        column t holds the value of the state before token t (read at position t - 1);
        column 0 is zero. Used as a PPO critic."""
        hidden = self.backbone(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        values = self.head(hidden).squeeze(-1)[:, :-1]
        return torch.nn.functional.pad(values, (1, 0))

    def score(self, batch: SequenceBatch) -> torch.Tensor:
        """(B,) reward of each row of a left- or right-padded batch."""
        return self(batch.input_ids, batch.attention_mask, batch.position_ids)


def save_reward_model(model: RewardModel, tokenizer, path: str | Path) -> Path:
    """Write `model` and `tokenizer` to the folder `path`; returns the folder.

    The backbone goes through `save_pretrained` (safetensors), so the folder also loads
    as a plain base model with `transformers.AutoModel`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(path)
    tokenizer.save_pretrained(path)
    head = {name: t.detach().cpu().contiguous() for name, t in model.head.state_dict().items()}
    save_file(head, str(path / REWARD_HEAD_FILE))
    config = {
        "format": REWARD_FORMAT,
        "head_shape": list(model.head.weight.shape),
        "hidden_size": model.backbone.config.hidden_size,
        "pooling": "last_real_token",
        "base_model": model.base_model,
        "graddyn_version": __version__,
    }
    (path / REWARD_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def resolve_reward_model_path(path_or_name: str | Path) -> Path:
    """`"default"` names the shipped reward model; anything else is a local folder.

    Raises:
        FileNotFoundError: the folder or its head file is missing; the message says how
            to build one.
    """
    if str(path_or_name) == DEFAULT_MODEL:
        path = default_reward_model_path()
        if not (path / REWARD_HEAD_FILE).exists():
            raise FileNotFoundError(
                f"{path}: the shipped default reward model is missing; build it with "
                "`graddyn build-reward-model`"
            )
        return path
    path = Path(path_or_name)
    if not (path / REWARD_HEAD_FILE).exists():
        raise FileNotFoundError(
            f"{path}: not a graddyn reward model folder (no {REWARD_HEAD_FILE}); reward "
            "models are local folders written by `graddyn build-reward-model` or "
            "`graddyn.reward.save_reward_model`"
        )
    return path


def load_reward_model(
    path_or_name: str | Path = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> tuple[RewardModel, object]:
    """The reward model and tokenizer saved in a folder, or the shipped one (`"default"`).

    Returned in eval mode with dropout off.

    Raises:
        FileNotFoundError: no reward model there (see `resolve_reward_model_path`).
        ValueError: the head file does not match `reward_config.json` or the backbone.
    """
    path = resolve_reward_model_path(path_or_name)
    config_file = path / REWARD_CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing; save the model again")
    config = json.loads(config_file.read_text())
    if config.get("format") != REWARD_FORMAT:
        raise ValueError(f"{config_file}: format is {config.get('format')!r}, not {REWARD_FORMAT}")

    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    backbone = AutoModel.from_pretrained(path, dtype=torch_dtype)
    disable_dropout(backbone)
    tensors = load_file(str(path / REWARD_HEAD_FILE))
    if list(tensors.get("weight", torch.empty(0)).shape) != config["head_shape"]:
        raise ValueError(
            f"{path / REWARD_HEAD_FILE}: the head weight does not have the shape "
            f"{config['head_shape']} recorded in {config_file}"
        )
    head = torch.nn.Linear(config["head_shape"][1], 1)
    head.load_state_dict(tensors)
    model = RewardModel(backbone.to(device), head, base_model=config.get("base_model"))
    return model.eval(), load_tokenizer(str(path))
