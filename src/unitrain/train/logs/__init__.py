"""What a run records: metrics, Weights & Biases, peak memory per phase."""
