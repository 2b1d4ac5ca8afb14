"""Stage 1, rows: input files → units of rows (`inputs.py`) → validated Documents of text segments with roles
(`schemas.py`, `groups.py`, dispatched by `extract.py`). Plain Python, no numpy arrays and no tokenizer yet."""
