"""The pure n-gram helpers the copying drafters share (prompt lookup, lookahead, the hybrid).

    find_continuations   what followed earlier occurrences of the text's last n tokens (PLD's
                         search, Saxena 2023; the most recent match first)
    build_trie           token sequences merged into one draft tree under a node budget
    NGramPool            token -> the n-grams that followed it, LRU (lookahead decoding's pool,
                         Fu et al. 2024, arXiv 2402.02057)

Each is a plain function or container over token-id lists, with a worked example (vLLM's n-gram
proposer is the model); no model, no tensors.
"""

from __future__ import annotations

from collections import OrderedDict

from ..engine.tree import ROOT, DraftTree


def find_continuations(
    ids: list[int],
    max_ngram: int = 3,
    min_ngram: int = 1,
    num_pred_tokens: int = 10,
    max_candidates: int = 4,
) -> list[list[int]]:
    """Continuations of earlier occurrences of the text's last n tokens, best first.

    For n = max_ngram down to min_ngram, the suffix ids[-n:] is looked for at every earlier start
    s (s + n < len(ids), so at least one token follows it), the most recent first; the candidate
    is ids[s + n : s + n + num_pred_tokens]. A candidate equal to, or a prefix of, one already
    taken adds nothing to a trie and is skipped; one that extends a candidate already taken (which
    was cut short by the end of the text) replaces it in place. At most `max_candidates` are
    returned.

    Example: in "a b c d | a b x | a b" (letters stand for token ids) the suffix "x a b" (n=3)
    never occurred before; "a b" (n=2) occurred twice: most recently followed by "x a b", first
    by "c d a". Then n=1 finds "b" at the same two places again (nothing new):

    >>> a, b, c, d, x = 1, 2, 3, 4, 9
    >>> find_continuations([a, b, c, d, a, b, x, a, b], max_ngram=3, num_pred_tokens=3)
    [[9, 1, 2], [3, 4, 1]]

    A match near the end is cut short by the end of the text; an older match extending it wins:
    "5 5" is followed by "5" (then the text ends), the older "5" by "5 5":

    >>> find_continuations([5, 5, 5], max_ngram=2, num_pred_tokens=4)
    [[5, 5]]
    """
    found: list[list[int]] = []
    total = len(ids)
    if total < 2:
        return found
    # where an earlier match can end (its last token equals the text's last, and a token follows
    # it), most recent first: list.index scans in C, so a step costs O(text) only once
    last, ends, e = ids[-1], [], -1
    try:
        while True:
            e = ids.index(last, e + 1, total - 1)
            ends.append(e)
    except ValueError:
        ends.reverse()
    for n in range(min(max_ngram, total - 1), min_ngram - 1, -1):
        suffix = ids[total - n :]
        for e in ends:
            s = e - n + 1
            if s < 0:
                break
            if ids[s : e + 1] != suffix:
                continue
            cont = ids[s + n : s + n + num_pred_tokens]
            if any(c[: len(cont)] == cont for c in found):
                continue
            # one taken is a prefix of this one (it ran into the end of the text): extend it in place
            shorter = next((i for i, c in enumerate(found) if cont[: len(c)] == c), None)
            if shorter is not None:
                found[shorter] = cont
                continue
            found.append(cont)
            if len(found) >= max_candidates:
                return found
    return found


def ends_in_repeat(ids: list[int], n: int) -> bool:
    """Whether the text's last n tokens occurred earlier in it (the text is copying itself).

    >>> ends_in_repeat([1, 2, 3, 9, 1, 2, 3], 3), ends_in_repeat([1, 2, 3, 9, 2, 3, 1], 3)
    (True, False)
    """
    if len(ids) <= n:
        return False
    suffix, last, total = ids[-n:], ids[-1], len(ids)
    e = n - 2
    try:
        while True:
            e = ids.index(last, e + 1, total - 1)
            if e >= n - 1 and ids[e - n + 1 : e + 1] == suffix:
                return True
    except ValueError:
        return False


def build_trie(sequences: list[list[int]], budget: int) -> DraftTree:
    """Merge token sequences below the root into a trie of at most `budget` nodes.

    Sequences are taken in order; a sequence that meets the budget is cut there (its prefix stays).

    >>> t = build_trie([[1, 2, 3], [1, 2, 4], [5]], budget=10)
    >>> t.tokens, t.parents
    ([1, 2, 3, 4, 5], [-1, 0, 1, 1, -1])
    >>> build_trie([[1, 2, 3], [1, 4]], budget=2).tokens
    [1, 2]
    """
    tree = DraftTree()
    child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for seq in sequences:
        node = ROOT
        for token in seq:
            nxt = child.get((node, token))
            if nxt is None:
                if len(tree) >= budget:
                    return tree
                nxt = tree.add(token, node)
                child[(node, token)] = nxt
            node = nxt
    return tree


class NGramPool:
    """token -> up to `per_key` n-grams (tuples of the n - 1 tokens that followed it), LRU.

    Re-inserting an n-gram makes it the most recent; a full key drops its oldest n-gram; beyond
    `max_keys` keys the least recently touched key goes.
    """

    def __init__(self, n: int, per_key: int, max_keys: int):
        self.n, self.per_key, self.max_keys = n, per_key, max_keys
        self._map: OrderedDict[int, list[tuple[int, ...]]] = OrderedDict()

    def __len__(self) -> int:  # n-grams held
        return sum(len(v) for v in self._map.values())

    def insert(self, key: int, gram: tuple[int, ...]) -> None:
        if len(gram) != self.n - 1 or self.per_key == 0:
            return
        grams = self._map.get(key)
        if grams is None:
            grams = self._map[key] = []
            if len(self._map) > self.max_keys:
                self._map.popitem(last=False)
        else:
            self._map.move_to_end(key)
        if gram in grams:
            grams.remove(gram)
        elif len(grams) >= self.per_key:
            grams.pop(0)
        grams.append(gram)

    def add_text(self, ids: list[int], start: int = 0) -> None:
        """Insert every n-gram of `ids` that starts at index >= start."""
        for s in range(start, len(ids) - self.n + 1):
            self.insert(ids[s], tuple(ids[s + 1 : s + self.n]))

    def lookup(self, key: int) -> list[tuple[int, ...]]:
        """The n-grams after `key`, most recent first."""
        return self._map.get(key, [])[::-1]
