"""One parsed row → a Document, whatever its schema: the dispatcher over `schemas.py` (text, sft, preference,
conversation) and `groups.py` (rows that rank several responses).

Trade-off: a module of its own for a few lines, so that `groups.py` builds on `schemas.py` and neither imports
the other back.
"""

from __future__ import annotations

from unitrain.data.rows.groups import extract_group
from unitrain.data.rows.schemas import Document, extract_document


def extract(schema: str, row_index: int, row: dict, fields: dict[str, str], render=None) -> Document:
    """One validated row → a Document of text segments; raises RowError."""
    if schema == "groups":
        return extract_group(row_index, row, fields, render)
    return extract_document(schema, row_index, row, fields, render)
