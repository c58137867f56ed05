"""The rows of one verification forward: a candidate tree plus auxiliary rows, and their masks.

A verification forward feeds the target, after its KV cache of `P` positions:

    [pending tokens (L >= 1)] [tree nodes (n)] [auxiliary rows (m)]

* The pending tokens are committed tokens not yet in the cache: the whole prompt on the first
  step, then the one "bonus" token of the previous step. They form a causal chain; the last one
  is the ROOT of the candidate tree.
* Tree node i holds a candidate token and has a parent (another node, or -1 for the root).
  A node sees the cache, the pending chain, its ancestors and itself, and sits at position
  `P + L - 1 + depth`, as if its path were the real continuation (Medusa/SpecInfer tree attention).
* Auxiliary rows are drafter-owned inputs (ESP's mask vectors, lookahead's Jacobi window) that no
  real token sees, so they never change what the target computes for the real tokens. Each one is
  anchored to a node (or the root), sees that node's path, a chosen set of earlier auxiliary rows,
  and itself, at position `position(anchor) + offset`.

`Layout` is the pure shape of that (no token values), so the visibility structure is built once
per shape and cached (`rows_structure`); each backend turns it into its own form (4-D additive
masks for transformers, sequence-id sets for llama.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

ROOT = -1


@dataclass
class DraftTree:
    """Candidate tokens below the root. Nodes are in topological order (parent index < own index)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # ROOT (-1) or an earlier node index

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError("tokens and parents differ in length")
        for i, p in enumerate(self.parents):
            if not (p == ROOT or 0 <= p < i):
                raise ValueError(f"node {i} has parent {p}: nodes must come after their parent")

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int = ROOT) -> int:
        self.tokens.append(int(token))
        self.parents.append(int(parent))
        return len(self.tokens) - 1

    def depths(self) -> list[int]:
        """Depth of each node; children of the root have depth 1."""
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p == ROOT else d[p] + 1)
        return d

    def children(self, allowed: set[int] | None = None) -> list[list[int]]:
        """children()[i + 1] lists the children of node i; children()[0] those of the root
        (with `allowed`, only the nodes in it)."""
        ch: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents):
            if allowed is None or i in allowed:
                ch[p + 1].append(i)
        return ch

    def main_chain_tree(self) -> tuple["DraftTree", list[int]]:
        """The main chain as a tree of its own, and the chain's node indices in this tree (to carry
        per-node values over): what a drafter offers a backend that verifies chains only.

        >>> chain, nodes = DraftTree([5, 6, 7, 8], [-1, -1, 0, 2]).main_chain_tree()
        >>> chain.tokens, chain.parents, nodes
        ([5, 7, 8], [-1, 0, 1], [0, 2, 3])
        """
        nodes = self.main_chain()
        return DraftTree.chain([self.tokens[i] for i in nodes]), nodes

    def main_chain(self) -> list[int]:
        """The first child of the root, its first child, and so on (a drafter's best path: nodes
        come best first).

        >>> DraftTree([5, 6, 7, 8], [-1, -1, 0, 2]).main_chain()
        [0, 2, 3]
        """
        first: dict[int, int] = {}
        for i, p in enumerate(self.parents):
            first.setdefault(p, i)
        chain, node = [], ROOT
        while node in first:
            node = first[node]
            chain.append(node)
        return chain

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root's child down to `node`, inclusive."""
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def prefix(self, n: int) -> "DraftTree":
        """The first n nodes (a tree: parents come first)."""
        return DraftTree(self.tokens[:n], self.parents[:n])

    @staticmethod
    def chain(tokens: list[int]) -> "DraftTree":
        return DraftTree(list(tokens), list(range(-1, len(tokens) - 1)))


@dataclass
class AuxRows:
    """Drafter-owned rows appended after the tree. Row j is fed `embeds[j]`.

    anchor[j]: the tree node (or ROOT) whose path row j sees;
    offset[j]: its position relative to its anchor (>= 1);
    sees[j]:   earlier auxiliary rows (indices < j) that row j also sees.
    """

    embeds: torch.Tensor  # [m, hidden] input embeddings (the embedding module's output for tokens)
    anchor: list[int]
    offset: list[int]
    sees: list[tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.anchor)


@dataclass(frozen=True)
class Layout:
    """The shape of the new rows of one forward (see the module docstring)."""

    n_pending: int
    parents: tuple[int, ...]  # per tree node
    aux_anchor: tuple[int, ...] = ()
    aux_offset: tuple[int, ...] = ()
    aux_sees: tuple[tuple[int, ...], ...] = ()

    @staticmethod
    def of(n_pending: int, tree: DraftTree, aux: AuxRows | None) -> "Layout":
        if aux is None or len(aux) == 0:
            return Layout(n_pending, tuple(tree.parents))
        return Layout(n_pending, tuple(tree.parents), tuple(aux.anchor), tuple(aux.offset), tuple(map(tuple, aux.sees)))

    @property
    def n_rows(self) -> int:
        return self.n_pending + len(self.parents) + len(self.aux_anchor)

    @staticmethod
    def rows_of(n_nodes: int, n_aux: int = 0, n_pending: int = 1) -> int:
        """Rows of a forward with these counts (what a drafter's budget prices a tree at)."""
        return n_pending + n_nodes + n_aux

    def kept_rows(self, path: list[int]) -> list[int]:
        """The rows a step keeps in the cache: every pending row, then the accepted nodes' rows.

        >>> Layout(2, (-1, 0, -1), (-1,), (1,), ((),)).kept_rows([2])
        [0, 1, 4]
        """
        return list(range(self.n_pending)) + [self.tree_row(i) for i in path]

    @property
    def is_chain(self) -> bool:
        """True when the rows are one causal chain (plain decoding): the model's own mask serves."""
        return not self.aux_anchor and all(p == i - 1 for i, p in enumerate(self.parents))

    def tree_row(self, node: int) -> int:
        """Row index of tree node `node` (ROOT gives the last pending row)."""
        return self.n_pending + node

    def aux_row(self, j: int) -> int:
        return self.n_pending + len(self.parents) + j


@lru_cache(maxsize=256)
def rows_structure(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible, offsets) for the new rows of `layout`, built once per shape.

    visible: [q, q] bool, visible[r, c] = row r attends to row c;
    offsets: [q] long, position of each row minus the position of the first pending row.
    """
    L, n, m = layout.n_pending, len(layout.parents), len(layout.aux_anchor)
    q = L + n + m
    vis = torch.zeros(q, q, dtype=torch.bool)
    off = torch.zeros(q, dtype=torch.long)
    vis[:L, :L] = torch.tril(torch.ones(L, L, dtype=torch.bool))
    off[:L] = torch.arange(L)
    root = L - 1
    for i, p in enumerate(layout.parents):
        r = L + i
        pr = root if p == ROOT else L + p
        vis[r] = vis[pr]
        vis[r, r] = True
        off[r] = off[pr] + 1
    for j in range(m):
        r = L + n + j
        a = layout.aux_anchor[j]
        ar = root if a == ROOT else L + a
        vis[r] = vis[ar]
        for s in layout.aux_sees[j]:
            vis[r, L + n + s] = True
        vis[r, r] = True
        off[r] = off[ar] + layout.aux_offset[j]
    return vis, off
