"""Data side: GPTSample, the memmap token format, prepare, sampling and packing into PackedBatch."""

from unitrain.data.batch import PackedBatch
from unitrain.data.sample import GPTSample

__all__ = ["GPTSample", "PackedBatch", "GPTMemmapDataset", "write_dataset"]


def __getattr__(name: str):
    # Imported on first use, so `import unitrain.data` stays cheap for code that never opens a dataset.
    if name in ("GPTMemmapDataset", "write_dataset"):
        from unitrain.data import memmap

        return getattr(memmap, name)
    raise AttributeError(name)
