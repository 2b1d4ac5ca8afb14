"""Inference on trained models: which model a path names (checkpoint, adapter, run), and completions from it."""
