"""Capture a Hugging Face `Trainer` run: a callback for step boundaries, a mixin for items.

`GraddynTrainer` is a `transformers.Trainer` whose causal-LM loss (the mean negative
log-likelihood over label tokens, i.e. SFT) is captured as items: one positive item per
sequence, weight 1, scale `1 / T` with `T` the label tokens of the effective batch. A
sequence's own loss is then its summed NLL, and its stored gradient does not depend on
the batch it was in. Other trainers
reuse `CaptureMixin` and only say how their loss becomes items (see
`graddyn.integrations.trl`).

The capture observes the trainer's own forward and backward passes; the gradient the
optimizer sees is unchanged. Per-sequence gradients are recorded before gradient
clipping; the shard attribute `grad_clipping` says whether the trainer then clipped the
aggregated gradient, and at what norm.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from graddyn.capture.session import CaptureConfig, CaptureSession
from graddyn.checkpoints import save_parameters
from graddyn.data.collate import SequenceBatch
from graddyn.items import WHOLE_SEQUENCE, Items
from graddyn.logprobs import gather_token_logprobs

logger = logging.getLogger(__name__)


class CaptureCallback(TrainerCallback):
    """Opens the session at train begin and brackets every optimizer step."""

    def __init__(self, owner: CaptureMixin) -> None:
        self.owner = owner

    def on_train_begin(self, args, state, control, **kwargs):
        self.owner.open_capture(state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self.owner.graddyn_session.start_step(state.global_step)
        self.owner.graddyn_batch_ids = []
        self.owner.graddyn_parts = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        learning_rate = optimizer.param_groups[0]["lr"]
        ids = torch.cat(self.owner.graddyn_batch_ids) if self.owner.graddyn_batch_ids else None
        batch = {"pair_ids" if self.owner.graddyn_loss == "dpo" else "sample_ids": ids}
        metrics = self.owner.step_metrics() if self.owner.graddyn_parts else {}
        self.owner.graddyn_session.end_step(batch, learning_rate, metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self.owner.close_capture()


class CaptureMixin:
    """Adds a graddyn capture session to a `transformers.Trainer` subclass.

    Args (keyword, besides the trainer's own):
        graddyn_run_dir: where shards and checkpoints go.
        graddyn_config: what to capture and when (default: every 10 steps).
    """

    graddyn_loss = "items"

    def __init__(
        self,
        *args,
        graddyn_run_dir: str | Path,
        graddyn_config: CaptureConfig | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.graddyn_run_dir = Path(graddyn_run_dir)
        self.graddyn_config = graddyn_config or CaptureConfig()
        self.graddyn_session: CaptureSession | None = None
        self.graddyn_batch_ids: list[torch.Tensor] = []
        self.graddyn_parts: list = []
        self._graddyn_next_id = 0
        self.add_callback(CaptureCallback(self))

    @property
    def graddyn_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def graddyn_run_attrs(self) -> dict:
        """Run attributes stored with every shard; subclasses add their loss's."""
        args = self.args
        model = self.graddyn_model
        return {
            "loss": self.graddyn_loss,
            "algorithm": self.graddyn_loss,
            "trainer": type(self).__name__,
            "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "per_device_batch_size": args.per_device_train_batch_size,
            "grad_accumulation": args.gradient_accumulation_steps,
            "learning_rate": args.learning_rate,
            "grad_clipping": {
                "clipped": args.max_grad_norm > 0,
                "max_grad_norm": args.max_grad_norm,
                "captured": "per-sequence gradients before clipping",
            },
            "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
            "gradient_checkpointing": bool(getattr(args, "gradient_checkpointing", False)),
            "attention_implementation": getattr(model.config, "_attn_implementation", ""),
            "dropout_disabled": not any(
                isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()
            ),
        }

    def open_capture(self, max_steps: int) -> None:
        self.graddyn_session = CaptureSession(
            self.graddyn_model,
            self.graddyn_run_dir,
            self.graddyn_config,
            max_steps,
            self.graddyn_run_attrs(),
        )

    def close_capture(self) -> None:
        if self.graddyn_session is not None:
            self.graddyn_session.close()
            save_parameters(
                self.graddyn_model, self.graddyn_run_dir / "checkpoints" / "final.safetensors"
            )

    def graddyn_capturing(self, model: torch.nn.Module) -> bool:
        session = self.graddyn_session
        return (
            session is not None and session.active and model.training and torch.is_grad_enabled()
        )

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the captured step over the effective batch, from `graddyn_parts`."""
        return {"loss": float(sum(self.graddyn_parts))}

    def next_ids(self, n: int) -> torch.Tensor:
        """Ids for the next `n` samples, counted over the whole run."""
        ids = torch.arange(self._graddyn_next_id, self._graddyn_next_id + n)
        self._graddyn_next_id += n
        self.graddyn_batch_ids.append(ids)
        return ids


def sequence_batch(input_ids, attention_mask, response_mask) -> SequenceBatch:
    """A `SequenceBatch` of a trainer's tensors (position ids from the attention mask)."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0) * attention_mask
    return SequenceBatch(input_ids, attention_mask, position_ids, response_mask)


class GraddynTrainer(CaptureMixin, Trainer):
    """`transformers.Trainer` with capture of its causal-LM loss as per-sequence items."""

    graddyn_loss = "sft"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.graddyn_capturing(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        self._observe_sft(inputs, outputs, loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _observe_sft(self, inputs, outputs, loss, num_items_in_batch) -> None:
        labels = inputs["labels"]
        response_mask = (labels != -100).long()
        response_mask[:, 0] = 0
        batch = sequence_batch(inputs["input_ids"], inputs["attention_mask"], response_mask)
        logp = gather_token_logprobs(outputs.logits, batch).sum(dim=1)
        accumulation = self.current_gradient_accumulation_steps
        tokens = (
            int(num_items_in_batch)
            if num_items_in_batch is not None
            else int(response_mask.sum()) * accumulation
        )
        n = logp.shape[0]
        ids = self.next_ids(n)
        items = Items(
            logp=logp,
            weight=torch.ones(n, dtype=torch.float64),
            sign=torch.ones(n, dtype=torch.int8),
            group=torch.zeros(n, dtype=torch.int8),
            sequence_id=ids,
            token_index=torch.full((n,), WHOLE_SEQUENCE),
            scale=1.0 / tokens,
            normalizer=tokens,
        )
        backpropagated = loss if num_items_in_batch is not None else loss / accumulation
        check_loss_value(items.surrogate_loss(), backpropagated, "causal-LM loss")
        self.graddyn_parts.append(float(backpropagated.detach()))
        self.graddyn_session.observe(items, None, batch, ids, verify=False)


def check_loss_value(
    ours: torch.Tensor, theirs: torch.Tensor, what: str, rtol: float = 1e-5
) -> None:
    """Refuse to capture when graddyn's items do not reproduce the trainer's loss."""
    a, b = float(ours.detach()), float(theirs.detach())
    if abs(a - b) > rtol * max(abs(a), abs(b), 1e-12):
        raise RuntimeError(
            f"graddyn's {what} ({a:.8g}) differs from the trainer's ({b:.8g}); "
            "the trainer uses a setting graddyn does not model"
        )
