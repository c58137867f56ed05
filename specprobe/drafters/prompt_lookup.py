"""PLD: prompt lookup decoding (Saxena, 2023; github.com/apoorvumang/prompt-lookup-decoding).

No draft model: the drafts are copied from the text itself. The last n committed tokens (n from
`max_ngram` down to `min_ngram`) are searched for in the earlier text, prompt and generated
tokens alike, and whatever followed an earlier occurrence is proposed as the continuation. This
pays off wherever the output repeats its input: summaries, edits, code, quoting.

The original proposes the single most recent match. Here the distinct continuations of several
matches (longer n first, then the most recent occurrence first) are proposed together, merged
into a trie so that continuations sharing a prefix share nodes, up to a node budget. The target
checks the whole trie in its one verification forward.

`find_continuations` (the search) and `build_trie` (the merge) are pure functions; the drafter
only wires them to the session. `build_trie` also serves lookahead decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..budget import parse_budget
from ..errors import InvalidOptionError
from ..tree import ROOT, DraftTree
from .base import Drafter, Proposal


@dataclass
class PLDConfig:
    max_ngram: int = 3  # longest suffix searched for
    min_ngram: int = 1  # shortest suffix searched for
    num_pred_tokens: int = 10  # tokens copied after a match (the depth of the trie)
    max_candidates: int = 4  # distinct continuations merged into the trie
    budget: int = 32  # tree nodes per step

    def __post_init__(self):
        self.budget = parse_budget(self.budget)
        if self.budget == "auto":
            raise InvalidOptionError("PLD takes a fixed --budget (an integer); --method hybrid sizes PLD's drafts automatically")
        for name in ("max_ngram", "min_ngram", "num_pred_tokens", "max_candidates", "budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"PLD option {name} must be an integer >= 1, got {value!r}")
        if self.min_ngram > self.max_ngram:
            raise InvalidOptionError(f"PLD option min_ngram ({self.min_ngram}) exceeds max_ngram ({self.max_ngram})")


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


class PLDDrafter(Drafter):
    name = "pld"

    def __init__(self, config: PLDConfig | None = None, **options):
        self.config = config or PLDConfig(**options)

    def propose(self, session) -> Proposal:
        cfg = self.config
        continuations = find_continuations(session.ids, cfg.max_ngram, cfg.min_ngram, cfg.num_pred_tokens, cfg.max_candidates)
        return Proposal(build_trie(continuations, cfg.budget))
