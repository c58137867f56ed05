"""Lookahead decoding (Fu, Bailis, Stoica, Zhang; arXiv 2402.02057; github.com/hao-ai-lab/LookaheadDecoding).

No draft model: the target itself runs Jacobi iterations on a window of guessed future tokens,
and the n-grams those iterations produce are kept in a pool and proposed as drafts later. Both
branches share the one verification forward of each step:

* lookahead branch (auxiliary rows, never seen by real tokens): a 2-D window of W columns and
  N - 1 levels. With the root (the last committed token) at position p, level 0 holds the tokens
  at p+1 .. p+W-1 (column 0 of level 0 is the root itself), and level l >= 1, column i holds a
  token at p+i+l. Each row sees level 0 up to its column and, above it, its own column: the
  trajectory root, level0[1..i], level1[i], ..., level_l[i] is a causal chain of consecutive
  positions (the paper's Figure 2 mask).
* verification branch (the DraftTree): up to G n-grams from the pool whose key is the root token,
  each the N - 1 tokens expected to follow it, merged into a trie.

After the forward (observe), the top level's argmax gives one more Jacobi level; each column then
spells an n-gram (level0[i-1] or the root, level1[i], ..., new[i]) that goes into the pool. The
window slides up one level: level 0 <- level 1 without its first column, level l <- level l+1,
top <- new. Like the reference (its ALWAYS_FWD_ONE mode) it slides by exactly one step however
many tokens were accepted: the window is a source of n-grams, not of aligned guesses.

The window starts as tokens drawn from the prompt with a fixed seed (as the reference does), so
the first step already runs both branches; n-grams are harvested only once every level above 0
is a model output (after N - 2 steps). With `prompt_pool`, the prompt's own n-grams seed the
pool and the committed text's n-grams are added as they are generated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from ..engine.protocol import Drafter, Proposal, StepResult
from ..engine.tree import ROOT, AuxRows
from ..errors import InvalidOptionError
from .ngram import NGramPool, build_trie


@dataclass
class LookaheadConfig:
    window: int = 7  # W: columns of the lookahead window
    ngram: int = 5  # N: n-gram length (key + N-1 tokens); the window has N-1 levels
    guess: int = 7  # G: n-grams kept per key, all proposed in the verification branch
    prompt_pool: bool = True  # seed the pool with the prompt's n-grams (and the generated text's)
    pool_keys: int = 8192  # keys the pool holds at most (least recently touched evicted first)
    seed: int = 0  # for the window's initial tokens

    def __post_init__(self):
        for name, low in (("window", 1), ("ngram", 3), ("guess", 0), ("pool_keys", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidOptionError(f"lookahead option {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.prompt_pool, bool):
            raise InvalidOptionError(f"lookahead option prompt_pool must be a bool, got {self.prompt_pool!r}")


@lru_cache(maxsize=16)
def window_layout(w: int, n: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(offsets, sees) of the window's auxiliary rows, all anchored to the root.

    Rows: level 0 columns 1..w-1 (row k is column k+1), then level l = 1..n-2, columns 0..w-1
    (row (w-1) + (l-1)*w + i). Level l, column i sits at root + i + l and sees level 0 columns
    1..i and its own column at levels 1..l-1.

    >>> offsets, sees = window_layout(3, 3)
    >>> offsets
    (1, 2, 1, 2, 3)
    >>> sees
    ((), (0,), (), (0,), (0, 1))
    """
    offsets: list[int] = [k + 1 for k in range(w - 1)]
    sees: list[tuple[int, ...]] = [tuple(range(k)) for k in range(w - 1)]
    for level in range(1, n - 1):
        for i in range(w):
            offsets.append(i + level)
            sees.append(tuple(range(i)) + tuple((w - 1) + (lv - 1) * w + i for lv in range(1, level)))
    return tuple(offsets), tuple(sees)


@dataclass
class JacobiWindow:
    """levels[0]: w-1 tokens (columns 1..w-1); levels[1..n-2]: w tokens each."""

    levels: list[list[int]]

    @staticmethod
    def from_prompt(prompt: list[int], w: int, n: int, seed: int) -> "JacobiWindow":
        rng = random.Random(seed)
        sizes = [w - 1] + [w] * (n - 2)
        return JacobiWindow([[rng.choice(prompt) for _ in range(size)] for size in sizes])

    def tokens(self) -> list[int]:
        """The window's tokens in auxiliary-row order."""
        return [t for level in self.levels for t in level]

    def ngrams(self, root: int, new_top: list[int]) -> list[tuple[int, tuple[int, ...]]]:
        """(key, following n-1 tokens) spelled by each column once `new_top` extends the top level.

        >>> JacobiWindow([[1, 2], [3, 4, 5]]).ngrams(root=0, new_top=[6, 7, 8])
        [(0, (3, 6)), (1, (4, 7)), (2, (5, 8))]
        """
        keys = [root] + self.levels[0]
        return [(keys[i], tuple(level[i] for level in self.levels[1:]) + (new_top[i],)) for i in range(len(new_top))]

    def advance(self, new_top: list[int]) -> "JacobiWindow":
        """One Jacobi step, sliding the window by one position.

        >>> JacobiWindow([[1, 2], [3, 4, 5], [6, 7, 8]]).advance([9, 10, 11]).levels
        [[4, 5], [6, 7, 8], [9, 10, 11]]
        """
        return JacobiWindow([self.levels[1][1:], *self.levels[2:], list(new_top)])


class LookaheadDrafter(Drafter):
    name = "lookahead"

    def __init__(self, config: LookaheadConfig | None = None, **options):
        self.config = config or LookaheadConfig(**options)

    def start(self, session) -> None:
        cfg = self.config
        self.pool = NGramPool(cfg.ngram, cfg.guess, cfg.pool_keys)
        if cfg.prompt_pool:
            self.pool.add_text(session.ids)
        self.pooled_upto = len(session.ids) - cfg.ngram + 1  # next n-gram start of the text to pool
        self.window = JacobiWindow.from_prompt(session.ids, cfg.window, cfg.ngram, cfg.seed)
        self.steps = 0  # Jacobi steps taken; harvest once levels 1.. are all model outputs

    def propose(self, session) -> Proposal:
        root = session.ids[-1]
        tree = build_trie([list(g) for g in self.pool.lookup(root)], budget=self.config.guess * (self.config.ngram - 1))
        offsets, sees = window_layout(self.config.window, self.config.ngram)
        embeds = session.target.embed(self.window.tokens())  # [m, hidden]
        return Proposal(tree, AuxRows(embeds, [ROOT] * len(offsets), list(offsets), list(sees)))

    def observe(self, session, step: StepResult) -> None:
        cfg = self.config
        if cfg.prompt_pool:
            self.pool.add_text(session.ids, max(self.pooled_upto, 0))
            self.pooled_upto = len(session.ids) - cfg.ngram + 1
        if step.drafts_dropped:  # no window rows ran this step (the last token, or the end of the context)
            return
        top = step.output.aux_logits[-cfg.window :]  # [w, vocab]: the top level's rows
        new_top = top.argmax(dim=-1).tolist()
        if self.steps >= cfg.ngram - 2:
            root = session.ids[-1 - len(step.emitted)]  # the root of the step just verified
            for key, gram in self.window.ngrams(root, new_top):
                self.pool.insert(key, gram)
        self.window = self.window.advance(new_top)
        self.steps += 1
