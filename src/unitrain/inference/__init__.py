"""What a model path names (checkpoint, adapter, run) and the prompts `generate` answers; above `train`, whose
checkpoints and held-out records it reads."""
