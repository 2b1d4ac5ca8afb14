"""Data side, in stages (see README.md): input rows → prepared memmap datasets → planned epochs → PackedBatch.

The public records and entry points are re-exported here: GPTSample, PackedBatch, GPTMemmapDataset,
write_dataset. Trade-off: the torch-backed ones are imported on first use, so `prepare` and `inspect`, which never
touch torch (whose import alone takes seconds), stay fast.
"""

from unitrain.data.sample import GPTSample

__all__ = ["GPTSample", "PackedBatch", "GPTMemmapDataset", "write_dataset"]

_LAZY = {"PackedBatch": "batch", "GPTMemmapDataset": "memmap.reader", "write_dataset": "memmap.writer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"unitrain.data.{_LAZY[name]}"), name)
    raise AttributeError(name)
