"""graddyn: see what a preference-optimization run is pulling a language model towards.

The library captures per-item gradients of a preference loss and of its components
(positive learning, negative learning, loss reweighting) during training, stores them in
HDF5 shards, and computes exact gradient alignment against target responses offline.

The public names below are imported lazily, so `import graddyn.store` stays free of torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    # capture
    "CaptureSession": "graddyn.capture.session",
    "CaptureConfig": "graddyn.capture.config",
    "ProjectionSpec": "graddyn.capture.projection",
    "KroneckerProjector": "graddyn.capture.projection",
    "DenseProjector": "graddyn.capture.projection",
    # items and losses
    "Items": "graddyn.items",
    "assign_groups": "graddyn.items",
    "regroup": "graddyn.items",
    "dpo_loss": "graddyn.losses.dpo",
    "dpo_metrics": "graddyn.losses.dpo",
    "sequence_id": "graddyn.losses.dpo",
    # data and models
    "PreferencePair": "graddyn.data.pairs",
    "load_pairs": "graddyn.data.pairs",
    "split_pairs": "graddyn.data.pairs",
    "PairTokenizer": "graddyn.data.batches",
    "SequenceBatch": "graddyn.data.collate",
    "TokenizedSequence": "graddyn.data.collate",
    "tokenize_sequence": "graddyn.data.collate",
    "collate_sequences": "graddyn.data.collate",
    "sequence_logprobs": "graddyn.logprobs",
    "response_token_logprobs": "graddyn.logprobs",
    "load_model": "graddyn.models",
    "load_tokenizer": "graddyn.models",
    # stages
    "DPOConfig": "graddyn.train.dpo",
    "train_dpo": "graddyn.train.dpo",
    "build_targets": "graddyn.targets",
    "load_targets": "graddyn.targets",
    "replay_run": "graddyn.replay.run",
    "analyze_run": "graddyn.report.summary",
    "RunReader": "graddyn.store.reader",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'graddyn' has no attribute {name!r}")
