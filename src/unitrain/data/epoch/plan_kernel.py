"""The compiled core of the epoch planner: exact best-fit decreasing over one window of items.

Best fit is sequential (each item's row depends on every earlier placement), so numpy cannot vectorize it and a
Python loop costs ~10 µs per item. This kernel is compiled once by numba (`cache=True` keeps the machine code in
`__pycache__`, so later processes load it in a fraction of a second) and costs O(log S) per item:

- items are sorted by cost, descending and stable (a counting sort: costs are at most S + 1 distinct values);
- a row's free slots v ∈ 1..S index a bucket; a segment tree over the buckets answers "the smallest free value ≥
  cost that has a row" by one climb and one descent;
- each bucket is a min-heap of row ids (a skew heap in two int arrays `left[row]`, `right[row]`: a row sits in
  at most one bucket at a time), so ties go to the lowest row id.

That is exactly the rule of a list of `(free, row id)` kept sorted and searched with `bisect_left(free, (cost,
-1))`, which the tests keep as the reference. A row whose free space reaches 0 leaves every bucket.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _heap_merge(a, b, left, right):
    """Merge two skew heaps of row ids (roots `a`, `b`; -1 is empty) → the new root."""
    if a < 0:
        return b
    if b < 0:
        return a
    if b < a:
        a, b = b, a
    root = a
    while True:  # top-down: merge b into a's right spine, then swap a's children
        child = right[a]
        right[a] = left[a]
        if child < 0:
            left[a] = b
            return root
        if b < child:
            child, b = b, child
        left[a] = child
        a = child


@njit(cache=True)
def _tree_set(tree, leaves, value):
    node = leaves + value
    while node > 0 and tree[node] == 0:
        tree[node] = 1
        node >>= 1


@njit(cache=True)
def _tree_clear(tree, leaves, value):
    node = leaves + value
    tree[node] = 0
    node >>= 1
    while node > 0:
        occupied = tree[2 * node] | tree[2 * node + 1]
        if tree[node] == occupied:
            return
        tree[node] = occupied
        node >>= 1


@njit(cache=True)
def _tree_first_at_least(tree, leaves, value):
    """The smallest occupied leaf ≥ `value`, or -1."""
    node = leaves + value
    if tree[node]:
        return value
    while node > 1:
        if node & 1 == 0 and tree[node + 1]:
            node += 1
            while node < leaves:
                node = 2 * node if tree[2 * node] else 2 * node + 1
            return node - leaves
        node >>= 1
    return -1


@njit(cache=True)
def pack_window(costs, capacity, one_per_row, order, row_sizes):
    """Best-fit decreasing of `costs` (n,) (each in 0..capacity) into rows of `capacity` slots.

    Writes `order` (n,): positions into `costs`, grouped by row (rows in creation order, items in the order they
    joined their row), and `row_sizes[:rows]`: items per row. Returns the number of rows. `one_per_row` gives each
    item its own row (in sorted order). Equal costs keep their order in `costs`.
    """
    n = costs.shape[0]
    counts = np.zeros(capacity + 2, np.int64)
    for k in range(n):
        counts[capacity - costs[k] + 1] += 1
    for c in range(1, capacity + 2):
        counts[c] += counts[c - 1]
    by_cost = np.empty(n, np.int64)  # stable, largest cost first
    for k in range(n):
        slot = capacity - costs[k]
        by_cost[counts[slot]] = k
        counts[slot] += 1
    row_of = np.empty(n, np.int64)
    rows = 0
    if one_per_row:
        for j in range(n):
            row_of[by_cost[j]] = j
        rows = n
    else:
        leaves = 1
        while leaves < capacity + 1:
            leaves *= 2
        tree = np.zeros(2 * leaves, np.uint8)
        heads = np.full(capacity + 1, -1, np.int64)
        left = np.full(n, -1, np.int64)
        right = np.full(n, -1, np.int64)
        for j in range(n):
            k = by_cost[j]
            cost = costs[k]
            free = _tree_first_at_least(tree, leaves, cost)
            if free < 0:
                row = rows
                rows += 1
                free = capacity
            else:
                row = heads[free]
                heads[free] = _heap_merge(left[row], right[row], left, right)
                if heads[free] < 0:
                    _tree_clear(tree, leaves, free)
            row_of[k] = row
            free -= cost
            if free > 0:
                left[row] = -1
                right[row] = -1
                if heads[free] < 0:
                    _tree_set(tree, leaves, free)
                heads[free] = _heap_merge(heads[free], row, left, right)
    for r in range(rows):
        row_sizes[r] = 0
    for k in range(n):
        row_sizes[row_of[k]] += 1
    start = np.empty(rows, np.int64)
    total = 0
    for r in range(rows):
        start[r] = total
        total += row_sizes[r]
    for j in range(n):  # in placement order, so items keep the order in which they joined their row
        k = by_cost[j]
        row = row_of[k]
        order[start[row]] = k
        start[row] += 1
    return rows
