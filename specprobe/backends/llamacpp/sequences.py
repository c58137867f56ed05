"""A verification tree as llama.cpp sequence sets: which sequence ids each row of a forward carries.

llama.cpp has no custom attention mask. What it has is sequences: every KV cell carries a set of
sequence ids, and a query row sees exactly the cells that carry its FIRST sequence id (its view)
at positions up to its own. Positions must run consecutively within every sequence. A tree (and
auxiliary rows such as ESP's masks) maps onto that when every row that starts a new branch gets a
sequence of its own, carried by every row it must see: then a row's view holds exactly its
ancestors. A row that continues the chain of the row just before it (it sees that row and all it
saw) shares that row's sequence, so a tree needs one sequence per branch, not per node.

Sequence 0 here stands for the committed text (the generation's own sequence in the cache): the
pending rows carry it and every branch sequence, and each branch sequence is given the committed
cells beforehand (`llama_memory_seq_cp`, which copies no data in a unified cache). The chain that
continues the pending rows stays on sequence 0 itself: the backend verifies such a chain (plus
auxiliary rows beside it), so keeping its accepted prefix is one `llama_memory_seq_rm` of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SequenceSets:
    """Per row, its sequence ids (local: 0 = the committed sequence, 1.. = branches), its view first."""

    rows: list[list[int]]
    n_branches: int


def assign_sequences(visible: list[list[bool]], positions: list[int], n_pending: int) -> SequenceSets:
    """Sequence sets for the rows of one forward.

    visible[r][c]: row r sees row c (c <= r; every row sees itself; pending rows form a causal
    chain); positions[r]: its position. Row r >= n_pending shares the branch of the row p it
    extends (p is its highest-positioned visible row, r sees exactly p and what p sees, and no
    other row has extended p's branch yet); otherwise it opens a branch, which every row it sees
    carries.

    Example: root (pending) -> a -> b continue the committed sequence 0; c beside a opens branch 1,
    which the root carries:

    >>> vis = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    >>> assign_sequences([[bool(x) for x in row] for row in vis], [9, 10, 11, 10], n_pending=1).rows
    [[0, 1], [0], [0], [1]]
    """
    q = len(positions)
    rows: list[list[int]] = [[0] for _ in range(q)]
    tip: dict[int, int] = {0: n_pending - 1}  # branch -> the last row that extends it (0: the committed chain)
    seen: list[frozenset[int]] = [frozenset(c for c in range(r) if visible[r][c]) for r in range(q)]
    n_branches = 0
    for r in range(n_pending, q):
        earlier = seen[r]
        parent = max(earlier, key=lambda c: positions[c]) if earlier else None
        if parent is None or positions[parent] != positions[r] - 1:
            raise ValueError(f"row {r} at position {positions[r]} does not continue a visible row: llama.cpp sequences need consecutive positions")
        branch = rows[parent][0]
        if tip.get(branch) == parent and earlier == seen[parent] | {parent}:
            rows[r] = [branch]
        else:
            n_branches += 1
            branch = n_branches
            rows[r] = [branch]
            for c in earlier:
                if c >= n_pending:
                    rows[c].append(branch)
        tip[branch] = r
    for r in range(n_pending):  # the pending rows are seen by every branch
        rows[r] = [0, *range(1, n_branches + 1)]
    return SequenceSets(rows, n_branches)
