"""The transformers backend: any decoder-only causal LM transformers builds, with unitrain's packed attention."""
