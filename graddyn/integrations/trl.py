"""Capture a TRL `DPOTrainer` run (`pip install graddyn[trl]`).

`GraddynDPOTrainer` is a `trl.DPOTrainer` that hands each micro-batch to a capture
session as DPO items. It respects TRL's batch layout (rows `0..n-1` chosen, `n..2n-1`
rejected, `completion_mask` marking the response tokens), reads the policy's per-token
log-probs from TRL's own forward pass, takes the reference log-probs from TRL's reference
pass (or from the precomputed columns), and ignores every pass without gradient. Before
it records anything it checks that graddyn's DPO loss on those log-probs equals TRL's
loss, and that `∂loss/∂log π` of every row is graddyn's `-β ω / N`.

TRL's fused LM head never materialises logits and bypasses the LM head module, so the
output layer is left out of the projected per-sequence gradients (the shard's
`projected_parameters` lists what is in); replay is exact over every parameter regardless.
Settings whose loss is not plain sigmoid DPO are refused at construction.
"""

from __future__ import annotations

import torch

from graddyn.capture.session import CaptureConfig
from graddyn.integrations.trainer import CaptureMixin, check_loss_value, sequence_batch
from graddyn.losses.dpo import CHOSEN, REJECTED, dpo_loss, dpo_metrics, sequence_id

try:
    from trl import DPOTrainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("graddyn.integrations.trl needs TRL: pip install 'graddyn[trl]'") from error


class _LogProbRecorder:
    """Keeps the `log_probs` output of every forward pass of the hooked modules."""

    def __init__(self) -> None:
        self.with_grad: list[torch.Tensor] = []
        self.without_grad: list[torch.Tensor] = []
        self.enabled = False

    def hook(self, module, args, output) -> None:
        if not self.enabled or getattr(output, "log_probs", None) is None:
            return
        target = self.with_grad if output.log_probs.requires_grad else self.without_grad
        target.append(output.log_probs)

    def clear(self) -> None:
        self.with_grad, self.without_grad = [], []


class GraddynDPOTrainer(CaptureMixin, DPOTrainer):
    """TRL's DPOTrainer with graddyn capture; extra keyword arguments `graddyn_run_dir`
    and `graddyn_config` (see `CaptureMixin`)."""

    graddyn_loss = "dpo"

    def __init__(
        self, *args, graddyn_run_dir, graddyn_config: CaptureConfig | None = None, **kwargs
    ) -> None:
        super().__init__(
            *args, graddyn_run_dir=graddyn_run_dir, graddyn_config=graddyn_config, **kwargs
        )
        self._refuse_unsupported()
        head = self._output_layer_name()
        config = self.graddyn_config
        if head and head not in config.exclude_layers:
            config.exclude_layers = (*config.exclude_layers, head)
        self._recorder = _LogProbRecorder()
        self.model.register_forward_hook(self._recorder.hook)
        if self.ref_model is not None:
            self.ref_model.register_forward_hook(self._recorder.hook)

    def _refuse_unsupported(self) -> None:
        problems = []
        if list(self.loss_types) != ["sigmoid"]:
            problems.append(f"loss_type={self.loss_types} (only 'sigmoid')")
        if list(self.loss_weights) != [1.0]:
            problems.append(f"loss_weights={self.loss_weights}")
        if self.ld_alpha is not None:
            problems.append("ld_alpha")
        if self.f_divergence_type != "reverse_kl":
            problems.append(f"f_divergence_type={self.f_divergence_type!r}")
        if self.use_weighting:
            problems.append("use_weighting=True")
        if self.aux_loss_enabled:
            problems.append("a router auxiliary loss (MoE)")
        if getattr(self.args, "padding_free", False):
            problems.append("padding_free=True")
        if problems:
            raise ValueError(
                "graddyn captures plain sigmoid DPO only; unsupported DPOConfig "
                f"settings: {', '.join(problems)}"
            )

    def _output_layer_name(self) -> str | None:
        model = self.graddyn_model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in model.named_modules():
            if module is head:
                return name
        return None

    def graddyn_run_attrs(self) -> dict:
        attrs = super().graddyn_run_attrs()
        attrs.update(
            beta=float(self.beta),
            item_kind="sequence",
            weight_name="omega",
            reference=(
                "precomputed"
                if self.precompute_ref_logps
                else "reference model"
                if self.ref_model is not None
                else "policy with adapters disabled"
            ),
        )
        return attrs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.graddyn_capturing(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._recorder.clear()
        self._recorder.enabled = True
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._recorder.enabled = False
        loss = result[0] if return_outputs else result
        self._observe_dpo(inputs, loss)
        return result

    def _observe_dpo(self, inputs, loss: torch.Tensor) -> None:
        if len(self._recorder.with_grad) != 1:
            raise RuntimeError(
                f"expected one policy forward pass with gradient, saw "
                f"{len(self._recorder.with_grad)}"
            )
        token_logp = self._recorder.with_grad[0]
        logp = token_logp.sum(dim=1)
        if self.precompute_ref_logps:
            reference = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            reference = self._recorder.without_grad[-1].sum(dim=1)
        reference = reference.to(logp.dtype).detach()
        n = logp.shape[0] // 2
        accumulation = self.current_gradient_accumulation_steps
        pair_ids = self.next_ids(n)
        out = dpo_loss(
            logp[:n],
            logp[n:],
            reference[:n],
            reference[n:],
            pair_ids,
            self.beta,
            total_pairs=n * accumulation,
        )

        backpropagated = loss / accumulation
        check_loss_value(out.loss, backpropagated, "DPO loss")
        self.graddyn_parts.append((out.chosen_rewards, out.rejected_rewards, out.omega))
        completion = inputs["completion_mask"][:, 1:].bool()
        self._check_coefficients(backpropagated, token_logp, completion, out.items.coefficient)
        rows = torch.cat([sequence_id(pair_ids, CHOSEN), sequence_id(pair_ids, REJECTED)])
        batch = sequence_batch(
            inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
        )
        self.graddyn_session.observe(
            out.items, None, batch, rows, extras={"logp_reference": reference}, verify=False
        )

    def step_metrics(self) -> dict[str, float]:
        chosen, rejected, omega = (torch.cat(p) for p in zip(*self.graddyn_parts, strict=True))
        return dpo_metrics(chosen, rejected, omega)

    @staticmethod
    def _check_coefficients(loss, token_logp, completion, coefficient, rtol=1e-4) -> None:
        """∂loss/∂(token log-prob) must be `-coefficient` of the token's row on completions."""
        (grad,) = torch.autograd.grad(loss, token_logp, retain_graph=True)
        expected = (-coefficient).to(grad.dtype).unsqueeze(1).expand_as(grad)
        error = (grad - expected).abs()[completion[:, -grad.shape[1] :]]
        if error.numel() and float(error.max()) > rtol * float(coefficient.abs().max()):
            raise RuntimeError(
                "TRL's loss gradient does not match graddyn's DPO items; "
                "the trainer uses a setting graddyn does not model"
            )
