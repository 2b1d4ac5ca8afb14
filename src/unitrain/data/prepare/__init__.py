"""Stage 3, prepare: Documents → token ids (`tokenize.py`) → one dataset per unit of input (`units.py`) → one
dataset (`pipeline.py`, what `unitrain prepare` runs). Uses the rows and memmap stages; never torch.

`from unitrain.data.prepare import PrepareConfig, prepare` is the documented entry point.
"""

from unitrain.data.prepare.pipeline import PrepareConfig, prepare, summary

__all__ = ["PrepareConfig", "prepare", "summary"]
