"""Token Recycling (Luo et al., ACL 2025; github.com/Luowaterbi/TokenRecycling): drafts from the
target's own past predictions, with no draft model and no extra forward.

Every verification forward computes, for each row, the target's distribution of the token after
that row's input token. Token Recycling keeps, for every vocabulary token t, the top-k tokens the
target predicted after t the last time t was an input (an adjacency matrix, `AdjacencyMatrix`:
[vocab, k] ids and their probabilities, a few MB), refreshed from every forward's rows. A draft is
a tree grown from the last token by following the matrix: the root's recorded successors, their
successors, and so on. The paper grows a fixed 80-node template breadth first; here the tree is
grown best first by the product of the recorded probabilities along each path (`expand`), and its
size is the hardware-aware budget's (budget.py, with the drafter's calibration) or a fixed one.

The matrix outlives a generation (the paper keeps one for the whole run): it is kept with the
target's model (`Backend.drafter_state`) and, with `state_file`, loaded from and saved to a file
(written atomically after each request).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.budget import AutoBudget, parse_budget
from ..engine.protocol import Drafter, Proposal, StepResult
from ..engine.tree import ROOT, DraftTree, Layout
from ..errors import InvalidOptionError
from ..store import save_torch

MATRIX_KEY = "adjacency-matrix"  # drafter_state key of a drafter's adjacency matrix (here and in hybrid.py, through shared_matrix)

STATE_VERSION = 1


TAIL_CUT = 16.0  # logits this far below a row's largest carry under e^-16 of its mass each: left out of its normalizer


def top_k_probabilities(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row and their probabilities under softmax(row):
    logits [rows, vocab] -> (ids [rows, k], probs [rows, k]), best first.

    On a CPU a row's normalizer (its log-sum-exp) is summed over the logits within TAIL_CUT of
    the row's largest, where almost all of a language model's mass is: each logit left out holds
    under e^-16 of the largest one's mass, so a probability comes out high by less than
    vocab x e^-16 (vocab x 1.13e-7) of itself, up to float32 rounding. Each row is then read three
    times (largest, band, values) instead of exponentiated whole and partially sorted (figures:
    docs/engine-measurements.md). Off the CPU, for logits that carry a gradient, or with fewer
    than k logits in that band: the exact softmax.

    >>> ids, probs = top_k_probabilities(torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])), k=2)
    >>> ids.tolist(), [[round(p, 3) for p in row] for row in probs.tolist()]
    ([[1, 2], [0, 2]], [[0.6, 0.3], [0.5, 0.3]])
    """
    logits = logits.float()
    if logits.device.type != "cpu" or logits.requires_grad:
        top = torch.topk(logits, k, dim=-1)
        return top.indices, (top.values - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    rows = logits.detach().numpy()
    largest = rows.max(axis=1)  # [rows]
    ids = np.empty((rows.shape[0], k), dtype=np.int64)
    probs = np.empty((rows.shape[0], k), dtype=np.float32)
    for r, row in enumerate(rows):
        band = np.flatnonzero(row >= largest[r] - TAIL_CUT)  # the row's likely tokens
        if band.size < k:
            band = np.arange(row.size)
        values = row[band]
        lse = largest[r] + np.log(np.exp(values - largest[r]).sum())
        best = np.argpartition(values, -k)[-k:]
        best = best[np.argsort(-values[best], kind="stable")]
        ids[r], probs[r] = band[best], np.exp(values[best] - lse)
    return torch.from_numpy(ids), torch.from_numpy(probs)


class AdjacencyMatrix:
    """token -> the top-k next tokens the target last predicted after it, with their probabilities.

    A tiny worked example: a vocabulary of 5 tokens, k = 2. One forward had rows with input
    tokens 3 and 1; after 3 the target put 0.7 on token 1 and 0.2 on token 4, after 1 it put 0.9
    on token 2. Growing a tree from token 3, best first: 1 (0.7), then 1's successor 2 (0.7 x 0.9
    = 0.63), then 4 (0.2):

    >>> m = AdjacencyMatrix(vocab=5, k=2)
    >>> logits = torch.log(torch.tensor([[0.02, 0.7, 0.02, 0.06, 0.2], [0.02, 0.02, 0.9, 0.03, 0.03]]))
    >>> m.update([3, 1], logits)
    >>> tree, scores = m.expand(3, max_nodes=3)
    >>> tree.tokens, tree.parents, [round(s, 2) for s in scores]
    ([1, 2, 4], [-1, 0, -1], [0.7, 0.63, 0.2])

    A token never seen as an input has no successors (ids -1):

    >>> m.expand(0, max_nodes=3)[0].tokens
    []
    """

    def __init__(self, vocab: int, k: int = 8):
        self.vocab, self.k = vocab, k
        self.ids = torch.full((vocab, k), -1, dtype=torch.int32)  # [vocab, k]
        self.probs = torch.zeros(vocab, k)  # [vocab, k]

    def update(self, tokens: list[int], logits: torch.Tensor) -> None:
        """Rows of one forward: input token of each row, and the row's logits [rows, vocab]."""
        if not tokens:
            return
        ids, probs = top_k_probabilities(logits, self.k)  # [rows, k] each
        index = torch.tensor(tokens, dtype=torch.long)
        self.ids[index] = ids.to(torch.int32)
        self.probs[index] = probs

    def expand(self, root: int, max_nodes: int, max_depth: int = 16) -> tuple[DraftTree, list[float]]:
        """The best-first tree below `root` (nodes in order of their path probability, a parent
        before its children) and each node's path probability."""
        tree, scores = DraftTree(), []
        heap: list[tuple[float, int, int, int]] = []  # (-path score, tie-break, parent node, token)
        counter = 0
        ids, probs = self.ids.numpy(), self.probs.numpy()  # views: reading a row costs less than from the tensors

        def push_children(token: int, parent: int, score: float, depth: int) -> None:
            nonlocal counter
            if depth >= max_depth:
                return
            for t, p in zip(ids[token].tolist(), probs[token].tolist()):
                if t >= 0 and p > 0:
                    heapq.heappush(heap, (-score * p, counter, parent, t))
                    counter += 1

        depth_of: list[int] = []
        push_children(root, ROOT, 1.0, 0)
        while heap and len(tree) < max_nodes:
            neg, _, parent, token = heapq.heappop(heap)
            node = tree.add(token, parent)
            scores.append(-neg)
            depth_of.append(1 if parent == ROOT else depth_of[parent] + 1)
            push_children(token, node, -neg, depth_of[node])
        return tree, scores

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str) -> None:
        save_torch({"version": STATE_VERSION, "vocab": self.vocab, "k": self.k, "ids": self.ids, "probs": self.probs}, path)

    @classmethod
    def load(cls, path: str, vocab: int, k: int) -> "AdjacencyMatrix":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unreadable file is the user's input error
            raise InvalidOptionError(f"cannot read the token-recycling state {path} ({type(e).__name__}); remove it or give another --state") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or state.get("vocab") != vocab or state.get("k") != k:
            raise InvalidOptionError(f"{path} is not a token-recycling state for this model (vocabulary {vocab}, k {k}); give another --state")
        m = cls(vocab, k)
        m.ids.copy_(state["ids"])
        m.probs.copy_(state["probs"])
        return m


def computed_rows(step: StepResult, verifies_trees: bool) -> tuple[slice | list[int], list[int]]:
    """(rows of the forward's logits, their input tokens) that the target actually computed: the
    root and every node, or the root and the main chain on a backend that verifies chains only.
    The rows are a slice where they are contiguous (always, for the trees drafters propose on a
    chains-only backend): indexing with it reads the logits without copying them."""
    tree = step.proposal.tree
    nodes = list(range(len(tree))) if verifies_trees else tree.main_chain()
    rows = slice(0, 1 + len(nodes)) if nodes == list(range(len(nodes))) else [0] + [1 + i for i in nodes]
    return rows, [tree.tokens[i] for i in nodes]


def shared_matrix(target, owner: str, k: int, state_file: str | None) -> AdjacencyMatrix:
    """The matrix kept with the target's model for drafter `owner` (loaded from `state_file` the
    first time, when that file exists)."""
    import os

    state = target.drafter_state()
    key = (MATRIX_KEY, owner, k, state_file)
    matrix = state.get(key)
    if matrix is None:
        if state_file and os.path.exists(state_file):
            matrix = AdjacencyMatrix.load(state_file, target.vocab_size, k)
        else:
            matrix = AdjacencyMatrix(target.vocab_size, k)
        state[key] = matrix
    return matrix


@dataclass
class TokenRecyclingConfig:
    k: int = 8  # successors kept per token (the paper's output_id_topk)
    budget: int | str = "auto"  # tree nodes per step, or auto (budget.py)
    max_budget: int = 80  # the largest tree auto considers (the paper's template has 80 nodes)
    max_depth: int = 8  # deepest draft
    state_file: str | None = None  # the matrix is loaded from and saved to this file (across processes)

    def __post_init__(self):
        self.budget = parse_budget(self.budget)
        for name in ("k", "max_budget", "max_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"token-recycling option {name} must be an integer >= 1, got {value!r}")


class TokenRecyclingDrafter(Drafter):
    name = "token-recycling"

    def __init__(self, config: TokenRecyclingConfig | None = None, **options):
        self.config = config or TokenRecyclingConfig(**options)

    def start(self, session) -> None:
        c = self.config
        if c.k > session.target.vocab_size:
            raise InvalidOptionError(f"token-recycling option k ({c.k}) exceeds the vocabulary size ({session.target.vocab_size})")
        self.matrix = shared_matrix(session.target, self.name, c.k, c.state_file)
        self.auto = AutoBudget(session.target, kind=self.name, session=session) if c.budget == "auto" else None
        self.scores: list[float] = []

    def propose(self, session) -> Proposal:
        c = self.config
        chains_only = not getattr(session.target, "verifies_trees", True)
        limit = c.max_budget if self.auto else c.budget
        tree, scores = self.matrix.expand(session.pending[-1], limit, c.max_depth)
        if chains_only:  # the best path only: the first child of each node is its best
            tree, chain = tree.main_chain_tree()
            scores = [scores[i] for i in chain]
        if self.auto is not None:
            n = self.auto.size(scores, tree.depths(), rows=lambda n: Layout.rows_of(n))
            tree, scores = tree.prefix(n), scores[:n]
        self.scores = scores
        return Proposal(tree)

    def observe(self, session, step: StepResult) -> None:
        rows, tokens = computed_rows(step, getattr(session.target, "verifies_trees", True))
        root = session.ids[len(session.ids) - len(step.emitted) - 1]  # the input token of row 0
        self.matrix.update([root, *tokens], step.output.logits[rows])
        tree = step.proposal.tree
        if self.auto is not None and len(tree):
            self.auto.observe_scores(self.scores, tree.parents, step.acceptance.path)

    def finish(self, session) -> None:
        if self.config.state_file:
            self.matrix.save(self.config.state_file)
