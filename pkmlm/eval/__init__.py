"""Judging trained models: exact loss and perplexity over a split, memory-usage metrics, sampling, the slot
inspector and the text codec they share. Used by the trainer (validation, samples) and the command lines."""
