"""Capture: the session API, layer hooks and projections used during training."""
