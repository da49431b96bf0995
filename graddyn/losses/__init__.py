"""Preference losses, each turning a batch's log-probs into items and a loss value."""
