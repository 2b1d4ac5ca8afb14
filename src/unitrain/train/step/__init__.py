"""One step's loss pieces: the preference loss of a micro-batch, the reference log-probs, the mix of objectives."""
