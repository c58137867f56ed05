"""Acceptance rules: which of the proposed tokens the target keeps.

Greedy (temperature 0): walk down the tree from the root; at each node the target's argmax is
the next token; if a child of the node holds it, the child is accepted and the walk goes on,
otherwise the walk stops. The target's argmax at the last accepted node is the bonus token.
The emitted tokens are therefore exactly those plain greedy decoding would produce.
"""

from __future__ import annotations

import torch

from .drafters.base import Acceptance
from .tree import ROOT, DraftTree


def greedy_accept(tree: DraftTree, logits: torch.Tensor) -> Acceptance:
    """logits: [1 + n_nodes, vocab], row 0 = root. Returns the accepted path and emitted tokens."""
    choice = logits.argmax(dim=-1).tolist()  # target's next token after each row
    children = tree.children()
    node, path, tokens = ROOT, [], []
    while True:
        token = choice[node + 1]
        tokens.append(token)
        nxt = next((c for c in children[node + 1] if tree.tokens[c] == token), None)
        if nxt is None:
            return Acceptance(path, tokens)
        path.append(nxt)
        node = nxt
