"""Capture for other trainers: Hugging Face `Trainer` (`graddyn.integrations.trainer`) and
TRL's `DPOTrainer` (`graddyn.integrations.trl`, needs `pip install graddyn[trl]`)."""
