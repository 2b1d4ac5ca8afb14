"""Stage 4, epoch planning: which items share a row of `sequence_length` slots, for a seeded epoch (`rules.py`,
`ranking.py`, `plan_items.py`, `plan_kernel.py`, `plan.py`, `plan_cache.py`). Numpy and numba only, never torch:
a test imports the planner in a fresh interpreter and checks that torch stays out."""
