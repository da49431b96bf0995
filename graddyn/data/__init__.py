"""Preference data: reading pairs, tokenizing with response masks, collating batches."""
