"""Stage 5, batches: planned rows → PackedBatch (`collate.py`), and the seeded, resumable, blended stream of
optimizer steps (`stream.py`). The first stage that uses torch."""
