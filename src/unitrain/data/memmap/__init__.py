"""Stage 2, the on-disk format: its layout (`format.py`), the writer (`writer.py`, `bulk.py`) and the reader
(`reader.py`, `columns.py`) kept together, so a field is added in one folder. Numpy only.

`from unitrain.data.memmap import GPTMemmapDataset, DatasetWriter, write_dataset` is the documented entry point.
"""

from unitrain.data.memmap.reader import GPTMemmapDataset
from unitrain.data.memmap.writer import DatasetWriter, write_dataset

__all__ = ["GPTMemmapDataset", "DatasetWriter", "write_dataset"]
