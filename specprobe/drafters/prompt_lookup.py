"""PLD: prompt lookup decoding (Saxena, 2023; github.com/apoorvumang/prompt-lookup-decoding).

No draft model: the drafts are copied from the text itself. The last n committed tokens (n from
`max_ngram` down to `min_ngram`) are searched for in the earlier text, prompt and generated
tokens alike, and whatever followed an earlier occurrence is proposed as the continuation. This
pays off wherever the output repeats its input: summaries, edits, code, quoting.

The original proposes the single most recent match. Here the distinct continuations of several
matches (longer n first, then the most recent occurrence first) are proposed together, merged
into a trie so that continuations sharing a prefix share nodes, up to a node budget. The target
checks the whole trie in its one verification forward.

`find_continuations` (the search) and `build_trie` (the merge) are pure functions (ngram.py); the
drafter only wires them to the session.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.budget import parse_budget
from ..engine.protocol import Drafter, Proposal
from ..errors import InvalidOptionError
from .ngram import build_trie, find_continuations


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


class PLDDrafter(Drafter):
    name = "pld"

    def __init__(self, config: PLDConfig | None = None, **options):
        self.config = config or PLDConfig(**options)

    def propose(self, session) -> Proposal:
        cfg = self.config
        continuations = find_continuations(session.ids, cfg.max_ngram, cfg.min_ngram, cfg.num_pred_tokens, cfg.max_candidates)
        return Proposal(build_trie(continuations, cfg.budget))
