"""unitrain: pretraining, SFT and DPO of Llama-family decoders from one memory-mapped token format."""

__version__ = "0.1.0"
