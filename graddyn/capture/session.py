"""The capture session: the public entry point a training loop calls on every step.

    session = CaptureSession(model, run_dir, CaptureConfig(every=10), total_steps=100,
                             run_attrs={"loss": "dpo", "beta": 0.1})
    for step in range(100):
        session.start_step(step)               # arms hooks on capture steps
        for micro_batch in ...:
            out = dpo_loss(...)                # items + loss, computed from items.logp
            session.observe(out.items, out.loss, batch, rows=sequence_ids_of_batch_rows)
            out.loss.backward()                # the hooks read this very backward
        optimizer.step()
        session.end_step(batch={"pair_ids": ids}, learning_rate=lr)
    session.close()

On a capture step the session takes a checkpoint of the trainable parameters before the
optimizer step, the applied update after it, the items of every micro-batch, and the
projected per-sequence gradients the layer hooks computed during the user's own
backward passes. It never runs a pass of its own and never touches `.grad`, so training
is bitwise the same with and without it. Writes happen on a background thread.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from graddyn.capture.config import CaptureConfig
from graddyn.capture.guards import prepare_run_dir, verify_items
from graddyn.capture.hooks import Collect, LayerHooks
from graddyn.capture.records import (
    checkpoint_name,
    component_arrays,
    save_safetensors,
    sequence_arrays,
    sequence_components,
    store_gradients,
    update_name,
)
from graddyn.data.collate import FlatSequences, SequenceBatch, flatten_batch
from graddyn.items import Items, regroup
from graddyn.store.manifest import write_manifest
from graddyn.store.shard import ShardRecord, shard_name, write_shard
from graddyn.store.writer import AsyncWriter

logger = logging.getLogger(__name__)

REDUCTION = (
    "loss gradient = sum_i coefficient_i * grad(-log pi_i), coefficient = scale*sign*weight; "
    "grads/per_sequence row = gradient of that sequence's own loss term, i.e. normalizer x "
    "its share of the loss gradient (independent of the batch it was in); "
    "grads/aggregate/<component> = loss gradient of the component = "
    "sum of its per-sequence rows / normalizer"
)


class CaptureSession:
    """Captures items, projected gradients and checkpoints of scheduled training steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        run_dir: str | Path,
        config: CaptureConfig | None = None,
        total_steps: int | None = None,
        run_attrs: dict | None = None,
        overwrite: bool = False,
    ) -> None:
        self.model = model
        self.run_dir = prepare_run_dir(run_dir, overwrite)
        self.config = config or CaptureConfig()
        self.total_steps = total_steps
        self.run_attrs = dict(run_attrs or {})
        self.parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.parameters:
            raise ValueError("the model has no parameter with requires_grad=True")
        self.hooks = LayerHooks(
            model,
            self.config.projection,
            {n for n in self.parameters if _in_scope(n, self.config.scope)},
            exclude=set(self.config.exclude_layers),
            strict=self._uses_hooks,
        )
        if self._uses_hooks and not self.hooks.layout:
            raise ValueError(f"capture scope {self.config.scope} matches no trainable parameter")
        self.hooks.collect = Collect(
            projected=self.config.per_sequence,
            norms=self.config.exact_norms,
            explicit=self.config.explicit_gradients,
        )
        self.writer = AsyncWriter(self.config.max_pending_writes)
        self.captured_steps: list[int] = []
        self._step: int | None = None
        self._before: dict[str, torch.Tensor] = {}
        self._items: list[dict[str, np.ndarray]] = []
        self._rows: list[tuple[np.ndarray, dict[str, torch.Tensor]]] = []
        self._pending_rows: np.ndarray | None = None
        self._sequences: list[tuple[np.ndarray, FlatSequences]] = []
        self._component_rows: dict[str, list] = {"positive": [], "negative": []}
        self._normalizer = 1
        self._full_aggregates: dict[str, torch.Tensor] = {}
        self._dropout_active = False
        write_manifest(self.run_dir, self._manifest())

    def _manifest(self) -> dict:
        return {
            "run": self.run_attrs,
            "capture": self.config.to_dict(),
            "total_steps": self.total_steps,
            "parameter_names": list(self.parameters),
            "projected_parameters": [asdict(slot) for slot in self.hooks.layout],
            "reduction": REDUCTION,
        }

    def is_capture_step(self, step: int) -> bool:
        """True on steps 0, every, 2·every, ... and on the last step."""
        last = self.total_steps is not None and step == self.total_steps - 1
        return step % self.config.every == 0 or last

    @property
    def active(self) -> bool:
        """Whether the current step is being captured."""
        return self._step is not None

    def start_step(self, step: int) -> bool:
        """Begin `step`; on a capture step arm the hooks and take the checkpoint."""
        if self._step is not None:
            raise RuntimeError(f"start_step({step}) before end_step() of step {self._step}")
        if not self.is_capture_step(step):
            return False
        self._step = step
        self._items, self._rows, self._pending_rows, self._sequences = [], [], None, []
        self._component_rows = {"positive": [], "negative": []}
        if self.config.checkpoints:
            self._before = {n: p.detach().to("cpu", copy=True) for n, p in self.parameters.items()}
        self._full_aggregates = {}
        self._dropout_active = self.model.training and any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules()
        )
        if self._uses_hooks:
            self.hooks.arm()
        return True

    def observe(
        self,
        items: Items,
        loss: torch.Tensor | None,
        batch: SequenceBatch,
        rows: torch.Tensor,
        extras: dict[str, torch.Tensor] | None = None,
        verify: bool | None = None,
    ) -> None:
        """Record one micro-batch's items; call after its forward, before `loss.backward()`.

        Args:
            items: the items the loss was computed from.
            loss: the micro-batch's loss, whose backward the hooks will read.
            batch: the policy's forward batch; its tokens are stored, so replay rebuilds
                the exact sequences without the data set or the tokenizer.
            rows: (B,) sequence id of each row of `batch`.
            extras: further per-item values to store under `items/<name>` (for example
                the reference log-probs).
            verify: check that `∂loss/∂items.logp == -items.coefficient` (default: the
                config's `verify_items`). An integration whose loss is computed by
                another library from other tensors checks the items its own way and
                passes `loss=None, verify=False`.
        """
        if self._step is None:
            return
        self._collect_rows()
        if self.config.verify_items if verify is None else verify:
            if loss is None:
                raise ValueError("observe() needs the loss to verify the items")
            verify_items(items, loss)
        row_ids = rows.detach().cpu().numpy().astype(np.int64)
        if self.config.full_aggregates:
            self._add_full_aggregates(items)
        self._normalizer = items.normalizer
        self._pending_rows = row_ids if self._uses_hooks else None
        if self._uses_hooks:
            self.hooks.arm()
            self.hooks.collect.chunk_rows = self._chunk_rows(batch)
            if bool((items.token_index >= 0).any()):
                self._split_components(items, row_ids)
        self._sequences.append((row_ids, flatten_batch(batch)))
        first_unit = sum(len(r["logp"]) for r in self._items)
        record = {
            "logp": items.logp.detach().double().cpu().numpy(),
            "weight": items.weight.detach().double().cpu().numpy(),
            "sign": items.sign.cpu().numpy().astype(np.int8),
            "sequence_id": items.sequence_id.cpu().numpy().astype(np.int64),
            "token_index": items.token_index.cpu().numpy().astype(np.int64),
            "coefficient": items.coefficient.detach().double().cpu().numpy(),
            "scale": np.full(len(items), float(items.scale)),
            "unit_id": (
                items.unit_id.cpu().numpy().astype(np.int64)
                if items.unit_id is not None
                else np.arange(first_unit, first_unit + len(items), dtype=np.int64)
            ),
        }
        for name, value in (extras or {}).items():
            record[name] = value.detach().double().cpu().numpy()
        self._items.append(record)

    def _split_components(self, items: Items, row_ids: np.ndarray) -> None:
        """Per-sequence quantities of each component, for token items (a sequence then
        holds positive and negative tokens, and its gradient mixes both).

        The hooks read one backward pass per component through the retained graph (two
        extra passes, on capture steps only) and then ignore the user's own backward.
        """
        params = list(self.parameters.values())
        for component, sign in (("positive", 1), ("negative", -1)):
            self.hooks.arm()
            mask = items.sign == sign
            if bool(mask.any()):
                coefficient = items.coefficient[mask].to(items.logp.dtype)
                part = (coefficient * -items.logp[mask]).sum()
                torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
                self._component_rows[component].append((row_ids, self._quantities()))
            else:
                zeros = {k: torch.zeros_like(v) for k, v in self._zero_quantities(len(row_ids))}
                self._component_rows[component].append((row_ids, zeros))
        self.hooks.paused = True
        self._pending_rows = None

    def _zero_quantities(self, rows: int):
        collect = self.hooks.collect
        if collect.projected:
            yield "per_sequence", torch.zeros(rows, self.hooks.width)
        if collect.norms:
            yield "norm", torch.zeros(rows)
        if collect.explicit:
            yield "explicit", torch.zeros(rows, self.hooks.parameter_count)

    def _add_full_aggregates(self, items: Items) -> None:
        """Exact component gradients by autograd; the hooks ignore these extra passes."""
        names, params = list(self.parameters), list(self.parameters.values())
        self.hooks.paused = True
        try:
            for component, sign in (("positive", 1), ("negative", -1)):
                mask = items.sign == sign
                if not bool(mask.any()):
                    continue
                coefficient = items.coefficient[mask].to(items.logp.dtype)
                part = (coefficient * -items.logp[mask]).sum()
                grads = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
                for name, grad in zip(names, grads, strict=True):
                    if grad is None:
                        continue
                    key = f"{component}/{name}"
                    previous = self._full_aggregates.get(key)
                    grad = grad.detach().cpu()
                    self._full_aggregates[key] = grad if previous is None else previous + grad
        finally:
            self.hooks.paused = False

    def _chunk_rows(self, batch: SequenceBatch) -> int | None:
        """Rows per chunk so that the hooks' working memory fits `memory_budget_mb`.

        Per row, the largest buffers are an explicit gradient (4 bytes per parameter in
        scope), a ghost-norm Gram matrix (4·T² per layer) and the projected factors
        (4·T·(k_in + k_out) per layer).
        """
        budget = self.config.memory_budget_mb
        if budget is None:
            return None
        length = batch.input_ids.shape[1]
        spec = self.config.projection
        per_row = 4 * length * (spec.k_in + spec.k_out)
        if self.config.exact_norms:
            per_row += 4 * length * length
        if self.config.explicit_gradients or spec.kind == "dense":
            per_row += 4 * self.hooks.parameter_count
        return max(1, int(budget * 2**20 // per_row))

    def _collect_rows(self) -> None:
        """Per-sequence quantities of the last micro-batch, scaled to each sequence's own
        loss (the normalizer of the batch mean removed)."""
        if self._pending_rows is None or not self._uses_hooks:
            return
        self._rows.append((self._pending_rows, self._quantities()))
        self._pending_rows = None

    def _quantities(self) -> dict[str, torch.Tensor]:
        """What the hooks computed for the last backward pass, per row."""
        n, collect = self._normalizer, self.hooks.collect
        quantities = {}
        if collect.projected:
            quantities["per_sequence"] = self.hooks.flat_rows().cpu() * n
        if collect.norms:
            quantities["norm"] = self.hooks.squared_norms().cpu().sqrt() * n
        if collect.explicit:
            quantities["explicit"] = self.hooks.flat_explicit().cpu().mul_(n)
        return quantities

    @property
    def _uses_hooks(self) -> bool:
        config = self.config
        return config.per_sequence or config.exact_norms or config.explicit_gradients

    def end_step(
        self,
        batch: dict[str, np.ndarray | torch.Tensor],
        learning_rate: float,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Finish the step; call after `optimizer.step()`. Queues the shard for writing.

        Args:
            batch: what rebuilds the effective batch exactly (e.g. `pair_ids` in order).
            learning_rate: the learning rate the optimizer step used.
            metrics: step metrics to store as shard attributes.
        """
        if self._step is None:
            return
        self._collect_rows()
        self.hooks.disarm()
        step, self._step = self._step, None
        if not self._items:
            raise RuntimeError(f"step {step} was captured but observe() was never called")
        record = self._shard_record(step, batch, learning_rate, metrics or {})
        if self.config.checkpoints:
            self._queue_checkpoint(step)
        path = self.run_dir / "shards" / shard_name(step)
        self.writer.submit(lambda: write_shard(path, record))
        self.captured_steps.append(step)

    def _shard_record(
        self, step: int, batch: dict, learning_rate: float, metrics: dict
    ) -> ShardRecord:
        items = {key: np.concatenate([r[key] for r in self._items]) for key in self._items[0]}
        items["group"] = regroup(
            torch.from_numpy(items["weight"]), torch.from_numpy(items["unit_id"])
        ).numpy()
        arrays = {f"items/{key}": value for key, value in items.items()}
        for key, value in batch.items():
            arrays[f"batch/{key}"] = np.asarray(
                value.cpu() if isinstance(value, torch.Tensor) else value
            )
        arrays.update(sequence_arrays(self._sequences))
        if self._rows:
            sequence_ids = np.concatenate([ids for ids, _ in self._rows])
            arrays["grads/sequence_id"] = sequence_ids
            for key in self._rows[0][1]:
                arrays[f"grads/{key}"] = torch.cat([q[key] for _, q in self._rows]).numpy()
        if self._component_rows["positive"]:
            arrays.update(component_arrays(self._component_rows, self._normalizer))
        elif "grads/per_sequence" in arrays:
            per_sequence = arrays["grads/per_sequence"]
            components = sequence_components(items, arrays["grads/sequence_id"])
            for name, sign in (("positive", 1), ("negative", -1)):
                total = per_sequence[components == sign].sum(0) / self._normalizer
                arrays[f"grads/aggregate/{name}"] = total
        for key, value in self._full_aggregates.items():
            arrays[f"grads/full/{key}"] = value.numpy()
        storage = store_gradients(arrays, self.config.storage_dtype)
        previous = self.captured_steps[-1] if self.captured_steps else -1
        attrs = dict(self.run_attrs)
        attrs.update(
            learning_rate=float(learning_rate),
            steps_since_previous=step - previous,
            projection=self.config.projection.to_dict(),
            reduction=REDUCTION,
            metrics=metrics,
            normalizer=self._normalizer,
            gradient_storage_dtype=storage,
            dropout_active=self._dropout_active,
            attention_implementation=getattr(
                getattr(self.model, "config", None), "_attn_implementation", "unknown"
            ),
            checkpoint=f"checkpoints/{checkpoint_name(step)}" if self.config.checkpoints else "",
            update=f"checkpoints/{update_name(step)}" if self.config.checkpoints else "",
        )
        strings = {
            "parameter_names": list(self.parameters),
            "projected_parameters": [slot.name for slot in self.hooks.layout],
        }
        arrays["layout/offset"] = np.array([s.offset for s in self.hooks.layout], np.int64)
        arrays["layout/size"] = np.array([s.size for s in self.hooks.layout], np.int64)
        return ShardRecord(step=step, attrs=attrs, arrays=arrays, strings=strings)

    def _queue_checkpoint(self, step: int) -> None:
        before = self._before
        update = {n: p.detach().cpu() - before[n] for n, p in self.parameters.items()}
        folder = self.run_dir / "checkpoints"
        self.writer.submit(lambda: save_safetensors(before, folder / checkpoint_name(step)))
        self.writer.submit(lambda: save_safetensors(update, folder / update_name(step)))
        self._before = {}

    def close(self) -> None:
        """Flush every pending write and update the manifest with the captured steps."""
        if self._step is not None:
            self.hooks.disarm()
            self._step = None
        self.writer.close()
        manifest = self._manifest()
        manifest["captured_steps"] = self.captured_steps
        write_manifest(self.run_dir, manifest)

    def __enter__(self) -> CaptureSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _in_scope(name: str, scope: tuple[str, ...]) -> bool:
    return not scope or any(name.startswith(prefix) for prefix in scope)
