"""Suffix decoding (SuffixDecoding, Oliaro et al., NeurIPS 2025; vLLM's `suffix` method): drafts
from suffix tries over the request's own text and over earlier requests' outputs.

Two tries of token substrings with occurrence counts (`SuffixTrie`, every substring up to
`max_tree_depth` tokens): one over this request's prompt and generated text, grown as the text
grows, and one global trie over the outputs of earlier requests (kept with the target's model,
at most `max_cached_requests` outputs, the oldest evicted first). At each step the longest suffix
of the text found in a trie (`match`) is the context; what followed its occurrences is the
speculation, grown best first by the empirical probability of each continuation (count of the
child / counts of all children), a token below `min_token_prob` not taken, and at most
`max_spec_factor` x (match length) tokens deep, so a long match speculates far and a one-token
match barely (SuffixDecoding's adaptive speculation length). The two tries' trees are merged;
the budget (budget.py) keeps the first n nodes by score.

Where outputs repeat across requests (agents, repeated tool calls, templated answers) the global
trie is what pays; within a request it behaves like prompt lookup with frequencies.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from ..engine.budget import AutoBudget, parse_budget
from ..engine.protocol import Drafter, Proposal, StepResult
from ..engine.tree import ROOT, DraftTree, Layout
from ..errors import InvalidOptionError

OUTPUTS_KEY = "suffix-outputs"  # drafter_state key of the tries of earlier requests' outputs (here and in hybrid.py)

# a node is [count, {token: node}]: how often its substring occurred, and what followed it
COUNT, CHILDREN = 0, 1


class SuffixTrie:
    """Every substring of at most `max_depth` tokens of the sequences added, with counts.

    Worked example (letters for token ids): after "a b c a b d", the substring "a b" occurred
    twice, followed once by "c" and once by "d"; the longest suffix of "x a b" found is "a b"
    (length 2); best first below it, "c" and "d" each have probability 1/2, and "c"'s own
    continuation "a" (the text went on "c a b") has 1/2 x 1:

    >>> a, b, c, d, x = 1, 2, 3, 4, 9
    >>> trie = SuffixTrie(max_depth=4)
    >>> trie.add([a, b, c, a, b, d])
    >>> node, length = trie.match([x, a, b])
    >>> length, node[COUNT], sorted(node[CHILDREN])
    (2, 2, [3, 4])
    >>> tree, scores = speculate(node, max_nodes=3, max_depth=2, min_token_prob=0.1)
    >>> tree.tokens, tree.parents, scores
    ([3, 4, 1], [-1, -1, 0], [0.5, 0.5, 0.5])

    A sequence can be extended token by token (`Growing`) and removed again (`remove`), which
    undoes exactly what `add` did:

    >>> trie.remove([a, b, c, a, b, d]); trie.nodes
    0
    """

    def __init__(self, max_depth: int = 24):
        self.max_depth = max_depth
        self.root: list = [0, {}]
        self.nodes = 0  # nodes below the root

    def add(self, tokens: list[int]) -> None:
        grow = Growing(self)
        for t in tokens:
            grow.append(t)

    def remove(self, tokens: list[int]) -> None:
        """Take back one `add(tokens)`: every substring's count drops by one; empty nodes go."""
        for start in range(len(tokens)):
            node = self.root
            path = []
            for t in tokens[start : start + self.max_depth]:
                child = node[CHILDREN][t]
                path.append((node, t, child))
                node = child
            for parent, t, child in reversed(path):
                child[COUNT] -= 1
                if child[COUNT] == 0:
                    del parent[CHILDREN][t]
                    self.nodes -= 1

    def match(self, tokens: list[int], max_length: int | None = None) -> tuple[list | None, int]:
        """(node, length) of the longest suffix of `tokens` (at most `max_length`) found in the
        trie with something after it, or (None, 0)."""
        longest = min(len(tokens), max_length or self.max_depth - 1, self.max_depth - 1)
        for m in range(longest, 0, -1):
            node = self.root
            for t in tokens[len(tokens) - m :]:
                node = node[CHILDREN].get(t)
                if node is None:
                    break
            if node is not None and node[CHILDREN]:
                return node, m
        return None, 0


class Growing:
    """A sequence being added to a trie one token at a time: the nodes of its current suffixes
    (active[j] holds the suffix of j + 1 tokens), so each token costs max_depth updates."""

    def __init__(self, trie: SuffixTrie):
        self.trie = trie
        self.active: list[list] = []

    def append(self, token: int) -> None:
        trie, grown = self.trie, []
        for node in [trie.root, *self.active[: trie.max_depth - 1]]:
            child = node[CHILDREN].get(token)
            if child is None:
                child = node[CHILDREN][token] = [0, {}]
                trie.nodes += 1
            child[COUNT] += 1
            grown.append(child)
        self.active = grown

    def context(self) -> tuple[list | None, int]:
        """(node, length) of the longest current suffix that occurred before with a continuation."""
        for m in range(len(self.active), 0, -1):
            node = self.active[m - 1]
            if node[CHILDREN]:
                return node, m
        return None, 0


def speculate(node: list, max_nodes: int, max_depth: int, min_token_prob: float) -> tuple[DraftTree, list[float]]:
    """The best-first tree of continuations below `node`: each child's probability is its count
    over the counts of its siblings, a path's score the product along it."""
    tree, scores, depth_of = DraftTree(), [], []
    heap: list[tuple[float, int, int, int, list]] = []
    counter = 0

    def push(n: list, parent: int, score: float, depth: int) -> None:
        nonlocal counter
        if depth >= max_depth:
            return
        total = sum(child[COUNT] for child in n[CHILDREN].values())
        for t, child in n[CHILDREN].items():
            p = child[COUNT] / total
            if p >= min_token_prob:
                heapq.heappush(heap, (-score * p, counter, parent, t, child))
                counter += 1

    push(node, ROOT, 1.0, 0)
    while heap and len(tree) < max_nodes:
        neg, _, parent, token, child = heapq.heappop(heap)
        index = tree.add(token, parent)
        scores.append(-neg)
        depth_of.append(1 if parent == ROOT else depth_of[parent] + 1)
        push(child, index, -neg, depth_of[index])
    return tree, scores


def merge_trees(trees: list[tuple[DraftTree, list[float]]]) -> tuple[DraftTree, list[float]]:
    """Best-first trees merged into one: a node in several keeps its best score; nodes re-sorted
    best first (a parent's score is never below its child's, so parents stay first).

    >>> t1 = (DraftTree([5, 6], [-1, 0]), [0.9, 0.5])
    >>> t2 = (DraftTree([5, 7], [-1, 0]), [0.6, 0.6])
    >>> tree, scores = merge_trees([t1, t2])
    >>> tree.tokens, tree.parents, scores
    ([5, 7, 6], [-1, 0, 0], [0.9, 0.6, 0.5])
    """
    key_of: dict[tuple[int, int], int] = {}
    entries: list[list] = []  # [token, parent entry, score, depth]
    for tree, scores in trees:
        local: list[int] = []
        for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
            p = ROOT if parent == ROOT else local[parent]
            e = key_of.get((p, token))
            if e is None:
                e = key_of[(p, token)] = len(entries)
                entries.append([token, p, scores[i], 1 if p == ROOT else entries[p][3] + 1])
            else:
                entries[e][2] = max(entries[e][2], scores[i])
            local.append(e)
    for e in entries:
        if e[1] != ROOT:
            e[2] = min(e[2], entries[e[1]][2])
    order = sorted(range(len(entries)), key=lambda i: (-entries[i][2], entries[i][3], i))
    new = {old: k for k, old in enumerate(order)}
    out = DraftTree()
    for old in order:
        out.add(entries[old][0], ROOT if entries[old][1] == ROOT else new[entries[old][1]])
    return out, [entries[i][2] for i in order]


class GlobalOutputs:
    """The trie over earlier requests' outputs, at most `max_requests` of them (oldest out first)."""

    def __init__(self, max_depth: int, max_requests: int):
        self.trie = SuffixTrie(max_depth)
        self.max_requests = max_requests
        self.outputs: deque[list[int]] = deque()

    def add(self, tokens: list[int]) -> None:
        if not tokens or self.max_requests == 0:
            return
        self.trie.add(tokens)
        self.outputs.append(list(tokens))
        while len(self.outputs) > self.max_requests:
            self.trie.remove(self.outputs.popleft())


@dataclass
class SuffixConfig:
    max_tree_depth: int = 24  # longest substring kept (and matched) in the tries
    max_spec_tokens: int = 32  # most nodes speculated per step
    max_spec_factor: float = 1.0  # speculation depth <= factor x match length (SuffixDecoding)
    min_token_prob: float = 0.1  # a continuation less frequent than this is not speculated
    max_cached_requests: int = 200  # outputs kept in the global trie (0: none); a 128-token output adds up to 128 x max_tree_depth nodes
    budget: int | str = "auto"  # tree nodes per step, or auto (budget.py)

    def __post_init__(self):
        self.budget = parse_budget(self.budget)
        for name in ("max_tree_depth", "max_spec_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise InvalidOptionError(f"suffix option {name} must be an integer >= 2, got {value!r}")
        if not isinstance(self.max_cached_requests, int) or self.max_cached_requests < 0:
            raise InvalidOptionError(f"suffix option max_cached_requests must be an integer >= 0, got {self.max_cached_requests!r}")
        if not 0 < self.max_spec_factor <= 64:
            raise InvalidOptionError(f"suffix option max_spec_factor must be in (0, 64], got {self.max_spec_factor!r}")
        if not 0 <= self.min_token_prob < 1:
            raise InvalidOptionError(f"suffix option min_token_prob must be in [0, 1), got {self.min_token_prob!r}")


class SuffixSource:
    """The two tries of one request, for this drafter and for the hybrid: `candidates` gives the
    merged best-first tree after the text so far, `advance` feeds the committed tokens."""

    def __init__(self, config: SuffixConfig, ids: list[int], global_outputs: GlobalOutputs | None):
        self.config = config
        self.local = SuffixTrie(config.max_tree_depth)
        self.growing = Growing(self.local)
        self.global_outputs = global_outputs
        self.fed = 0
        self.advance(ids)

    def advance(self, ids: list[int]) -> None:
        for t in ids[self.fed :]:
            self.growing.append(t)
        self.fed = len(ids)

    def candidates(self, ids: list[int], max_nodes: int) -> tuple[DraftTree, list[float]]:
        c = self.config
        trees = []
        for node, length in (self.growing.context(), self.global_outputs.trie.match(ids) if self.global_outputs else (None, 0)):
            if node is not None:
                depth = max(1, int(c.max_spec_factor * length))
                trees.append(speculate(node, max_nodes, depth, c.min_token_prob))
        return merge_trees(trees) if trees else (DraftTree(), [])


class SuffixDrafter(Drafter):
    name = "suffix"

    def __init__(self, config: SuffixConfig | None = None, **options):
        self.config = config or SuffixConfig(**options)

    def start(self, session) -> None:
        c = self.config
        state = session.target.drafter_state()
        key = (OUTPUTS_KEY, c.max_tree_depth, c.max_cached_requests)
        if c.max_cached_requests and key not in state:
            state[key] = GlobalOutputs(c.max_tree_depth, c.max_cached_requests)
        self.source = SuffixSource(c, session.ids, state.get(key))
        self.auto = AutoBudget(session.target, kind=self.name, session=session) if c.budget == "auto" else None
        self.scores: list[float] = []

    def propose(self, session) -> Proposal:
        c = self.config
        self.source.advance(session.ids)
        tree, scores = self.source.candidates(session.ids, c.max_spec_tokens)
        if not getattr(session.target, "verifies_trees", True):
            tree, chain = tree.main_chain_tree()
            scores = [scores[i] for i in chain]
        n = self.auto.size(scores, tree.depths(), rows=lambda n: Layout.rows_of(n)) if self.auto else c.budget
        tree, self.scores = tree.prefix(n), scores[:n]
        return Proposal(tree)

    def observe(self, session, step: StepResult) -> None:
        tree = step.proposal.tree
        if self.auto is not None and len(tree):
            self.auto.observe_scores(self.scores, tree.parents, step.acceptance.path)

    def finish(self, session) -> None:
        if self.source.global_outputs is not None:
            self.source.global_outputs.add(session.generated)
