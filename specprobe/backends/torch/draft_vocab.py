"""The reduced draft vocabulary: the tokens the engine has seen most often.

Rows that only feed drafts (lookahead's Jacobi window, ESP's masks) need a good guess, not the
exact distribution, so they may be scored over part of the vocabulary only, as EAGLE-3 scores its
draft head over the most frequent tokens of its training data (arXiv 2503.01840). Verification
rows always get the full head: what is emitted never depends on this choice.

The data here is the text the engine itself processes: every prompt and every committed token of
every generation served by one target (a process serving one kind of traffic learns that
traffic's vocabulary). `TokenFrequencies` counts them; the reduced vocabulary is a fixed share of
the whole (vocab / MAX_FRACTION tokens): the tokens seen, most frequent first, then the tokens
never seen in id order (byte-pair tokenizers number their tokens roughly by frequency in their
own training data). It says when the seen tokens have grown enough to rebuild the reduced head
(a copy of those rows of the head's weight). What it gained, and why the fill-up:
docs/engine-measurements.md.
"""

from __future__ import annotations

import torch

MAX_FRACTION = 8  # the reduced vocabulary holds at most vocab / MAX_FRACTION tokens
MIN_TOKENS = 16  # fewer distinct tokens seen than this: no reduced vocabulary yet
REFRESH_GROWTH = 1.1  # rebuild when the distinct tokens seen grew by 10 % since the last build


class TokenFrequencies:
    """How often each token id was seen; the reduced vocabulary is the vocab / MAX_FRACTION ids
    ranked by count (most frequent first), ties by id (never-seen tokens in id order).

    >>> f = TokenFrequencies(vocab_size=1000)
    >>> f.observe([500, 700, 500, 900] * 4 + list(range(20, 40)))
    True
    >>> len(f.top())                          # 1000 // 8 tokens
    125
    >>> f.top()[:5]                           # 500 (8 times), 700 and 900 (4 times), then 20, 21, ...
    [500, 700, 900, 20, 21]
    >>> f.observe([500, 700])                 # nothing new: no rebuild needed
    False
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.counts = torch.zeros(vocab_size, dtype=torch.long)  # [vocab]
        self.distinct = 0  # distinct tokens seen
        self.built_at = 0  # distinct tokens seen when the reduced vocabulary was last built

    @property
    def size(self) -> int:
        return max(1, self.vocab_size // MAX_FRACTION)

    def observe(self, token_ids: list[int]) -> bool:
        """Count these tokens; True when the reduced vocabulary should be (re)built: once MIN_TOKENS
        distinct tokens were seen, then whenever they grew by REFRESH_GROWTH."""
        ids = torch.tensor([t for t in token_ids if 0 <= t < self.vocab_size], dtype=torch.long)
        if not len(ids):
            return False
        self.distinct += int((self.counts[ids.unique()] == 0).sum())
        self.counts.index_add_(0, ids, torch.ones_like(ids))
        if self.distinct < MIN_TOKENS or self.distinct < self.built_at * REFRESH_GROWTH:
            return False
        self.built_at = self.distinct
        return True

    def top(self) -> list[int]:
        """The `size` ids of the reduced vocabulary, most frequent first (ties: the smaller id first)."""
        order = torch.sort(self.counts, descending=True, stable=True).indices
        return order[: self.size].tolist()
