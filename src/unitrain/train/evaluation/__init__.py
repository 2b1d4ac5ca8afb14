"""What a run shows of the model while it trains: validation and generated samples."""
