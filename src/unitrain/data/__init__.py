"""Data side: GPTSample, the memmap token format, prepare, sampling and packing into PackedBatch."""

from unitrain.data.sample import GPTSample

__all__ = ["GPTSample", "PackedBatch", "GPTMemmapDataset", "write_dataset"]

# Imported on first use: `prepare` and `inspect` never touch torch, whose import alone takes seconds.
_LAZY = {"PackedBatch": "batch", "GPTMemmapDataset": "memmap", "write_dataset": "writer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"unitrain.data.{_LAZY[name]}"), name)
    raise AttributeError(name)
