"""What a capture session captures, and when."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from graddyn.capture.projection import ProjectionSpec


@dataclass
class CaptureConfig:
    """What to capture and when.

    Attributes:
        every: capture every `every` steps (step 0 included) and always the last step.
        projection: the Kronecker projection of per-sequence gradients.
        per_sequence: store projected per-sequence gradients.
        exact_norms: store the exact norm of each sequence's gradient over every parameter
            in scope (`grads/norm`), from the same hooks, without forming the gradients.
        explicit_gradients: store each sequence's full gradient (`grads/explicit`, one
            row of every parameter in scope per sequence); for small models and checks.
        full_aggregates: also store the exact, unprojected aggregated gradient of each
            component over every parameter in scope. Costs one extra backward pass per
            component on capture steps (through the retained graph) and a parameter-sized
            array per component in each shard; off by default.
        checkpoints: store the parameters before each captured step and the update.
        verify_items: check on every captured micro-batch that `∂loss/∂items.logp`
            equals `-items.coefficient` (the items really describe the loss).
        exclude_layers: names of modules left out of the per-sequence quantities (for
            example an LM head that a fused kernel bypasses).
        scope: parameter-name prefixes of the per-sequence quantities (empty: every
            trainable parameter). The dense projection needs a small scope.
        storage_dtype: "float32" or "float16" for stored gradients (computation always
            accumulates in float32 or higher). A float16 value that would overflow makes
            the shard fall back to float32, with a warning; inf is never written.
        memory_budget_mb: bound on the hooks' per-micro-batch working memory; rows are
            processed in chunks that fit it (results are the same for any chunking).
        max_pending_writes: bound of the background writer's queue.
    """

    every: int = 10
    projection: ProjectionSpec = field(default_factory=ProjectionSpec)
    per_sequence: bool = True
    exact_norms: bool = False
    explicit_gradients: bool = False
    full_aggregates: bool = False
    checkpoints: bool = True
    verify_items: bool = True
    exclude_layers: tuple[str, ...] = ()
    scope: tuple[str, ...] = ()
    storage_dtype: str = "float32"
    memory_budget_mb: float | None = None
    max_pending_writes: int = 2

    def to_dict(self) -> dict:
        return asdict(self)
