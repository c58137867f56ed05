"""Acceptance rules: which of the proposed tokens the target keeps (greedy, and sampling).

Every rule walks down the draft tree from the root and returns an `Acceptance`: the accepted nodes,
then one final token drawn from the target at the last accepted node. Naming as in vLLM:
  accepted   drafted tokens the rule kept
  recovered  the final token when some child of the last node was rejected: drawn from what is
             left of the target's distribution once the rejected candidates are taken out
  bonus      the final token when the last node had no children to try: drawn from the target
             itself (greedy: its argmax)

Greedy (temperature 0): at each node the target's argmax is the next token; a child holding it
is accepted, otherwise the walk stops. The emitted tokens are exactly plain greedy decoding's.

Sampling: the target's distribution p at a row is softmax(logits / temperature) cut to the top_k
tokens, then to the top_p nucleus, renormalised: the order transformers' `generate` applies them.
Two rules, both exact (every emitted token is distributed as the target's own sample would be):

* `accept_deterministic` (ESP, prompt lookup, lookahead, hybrid: candidates without a draft
  distribution). At a node with residual r = p: try the children in order; child c is accepted
  with probability r(c); if not, r(c) <- 0 and r is renormalised. If none is accepted, the
  recovered token is drawn from r. (A candidate is a point mass; this is recursive rejection
  sampling with q = that point mass, so min(1, r(c)/q(c)) = r(c).)
  The engine runs this rule in its Gumbel-coupled form (`accept_by_position_noise`): the same
  outcome distribution, with randomness tied to (seed, position), so that a seed gives the same
  text whatever the drafts were (a tree's size may follow timings, see budget.py).
* `accept_with_draft_probs` (a draft model sampling its candidates): children were drawn i.i.d.
  from the draft distribution q of their parent. Child c is accepted with probability
  min(1, r(c) / q(c)); on rejection r <- normalise(max(0, r - q)) (Leviathan et al. 2023), child
  after child (SpecInfer's recursive rejection sampling, arXiv 2305.09781). If none is accepted
  the recovered token is drawn from r.

All randomness comes from the `torch.Generator` passed in: same seed, same machine, same output.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import InvalidOptionError
from .protocol import Acceptance
from .tree import ROOT, DraftTree

SEED_LIMIT = 2**63  # torch's generators take seeds below 2**64; the coupled noise multiplies them, so keep a margin


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # None: a random seed

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidOptionError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:  # NaN fails the comparison
            raise InvalidOptionError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InvalidOptionError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < SEED_LIMIT):
            raise InvalidOptionError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device="cpu") -> torch.Generator:
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits [rows, vocab] -> probabilities [rows, vocab] after temperature, top-k and top-p."""
    return warped_scores(logits, cfg).softmax(dim=-1)


def warped_scores(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits [rows, vocab] / temperature, -inf outside the top-k and the top-p nucleus: the log
    of `target_probs` up to a constant per row."""
    if _fault == "warp-order":  # deliberately wrong (tests only): the cuts before the temperature
        return _cut(logits.float(), cfg).div(cfg.temperature)
    return _cut(logits.float() / cfg.temperature, cfg)


def _cut(scores: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """scores [rows, vocab] with every token outside the top-k, then outside the top-p nucleus, at
    -inf (ties at the k-th score kept, as transformers' TopKLogitsWarper keeps them)."""
    compact = _cut_compact(scores, cfg)
    if compact is None:
        return scores
    values, index = compact
    return torch.full_like(scores, float("-inf")).scatter_(-1, index, values)


def _cut_compact(scores: torch.Tensor, cfg: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`_cut` as (values, index) [rows, m], values descending and -inf where cut, or None when
    nothing is cut. With a top-k, the nucleus is found among the k survivors only (no sort of the
    whole vocabulary)."""
    vocab = scores.shape[-1]
    top_k = cfg.top_k if cfg.top_k and cfg.top_k < vocab else 0
    if not top_k and cfg.top_p >= 1.0:
        return None
    if top_k:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]  # [rows, 1]
        survivors = int((scores >= kth).sum(dim=-1).max())  # k, or more where scores tie at the k-th
        values, index = torch.topk(scores, survivors, dim=-1)  # [rows, survivors], descending
        values = values.masked_fill(values < kth, float("-inf"))
    else:
        values, index = torch.sort(scores, dim=-1, descending=True)  # [rows, vocab]
    if cfg.top_p < 1.0:
        ascending = values.flip(-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - cfg.top_p  # the low tail whose mass is at most 1 - top_p
        drop[..., -1:] = False  # always keep the most likely token
        values = ascending.masked_fill(drop, float("-inf")).flip(-1)
    return values, index


class RowScores:
    """The coupled rule's view of a forward's logits: each row warped (temperature, top-k, top-p)
    when the rule first reads it (the rule visits the root and the accepted path only, not every
    row of a tree), and sampled with the row's support in hand (no pass over the vocabulary to
    find it)."""

    def __init__(self, logits: torch.Tensor, cfg: SamplingConfig):  # logits [rows, vocab]
        self.logits, self.cfg, self.rows = logits, cfg, {}

    def _support(self, row: int) -> tuple[list[int], list[float]] | None:
        """(tokens, scores) of the row's support when a cut applies, else None (all tokens)."""
        if row not in self.rows:
            x = self.logits[row : row + 1].float()
            if _fault == "cuts-after-noise":  # deliberately wrong (tests only): the cuts applied to the noisy scores, where they never change the argmax
                compact = None
            elif _fault == "warp-order":  # deliberately wrong (tests only): the cuts before the temperature
                compact = _cut_compact(x, self.cfg)
                compact = None if compact is None else (compact[0] / self.cfg.temperature, compact[1])
            else:
                compact = _cut_compact(x / self.cfg.temperature, self.cfg)
            if compact is None:
                self.rows[row] = None
            else:
                values, index = compact[0][0], compact[1][0]
                keep = torch.isfinite(values)
                self.rows[row] = (index[keep], values[keep])  # [m] each
        return self.rows[row]

    def sample(self, row: int, noise: "PositionNoise", position: int) -> int:
        support = self._support(row)
        if support is None or len(support[0]) > SMALL_SUPPORT:
            return gumbel_argmax(self[row], noise, position)
        return _gumbel_argmax_of(support[0].tolist(), support[1].tolist(), noise, position)

    def __getitem__(self, row: int) -> torch.Tensor:  # -> [vocab], the warped scores
        support = self._support(row)
        if support is None:
            return self.logits[row].float() / self.cfg.temperature
        return torch.full((self.logits.shape[-1],), float("-inf")).index_put_((support[0],), support[1])


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:  # probs [vocab]
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator).item())


def greedy_accept(tree: DraftTree, logits: torch.Tensor, allowed: set[int] | None = None) -> Acceptance:
    """logits: [1 + n_nodes, vocab], row 0 = root. Returns the accepted path and emitted tokens.
    allowed: the nodes that may be accepted (None: all; a backend that verifies chains only
    passes its main chain)."""
    choice = logits.argmax(dim=-1).tolist()  # target's next token after each row
    children = tree.children(allowed)
    node, path, tokens = ROOT, [], []
    while True:
        token = choice[node + 1]
        tokens.append(token)
        nxt = next((c for c in children[node + 1] if tree.tokens[c] == token), None)
        if nxt is None:
            return Acceptance(path, tokens, recovered=bool(children[node + 1]))
        path.append(nxt)
        node = nxt


def _walk(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator, trial, allowed: set[int] | None = None) -> Acceptance:
    """Walk down from the root; at each node try its children in order with
    `trial(child, residual) -> (accepted, residual)`; where all fail, draw from the residual."""
    children = tree.children(allowed)
    node, path, tokens = ROOT, [], []
    while True:
        residual = probs[node + 1].clone()  # [vocab]
        kids = children[node + 1]
        chosen = None
        for c in kids:
            accepted, residual = trial(c, residual)
            if accepted:
                chosen = c
                break
        if chosen is None:
            tokens.append(_draw(residual, generator))
            return Acceptance(path, tokens, recovered=bool(kids))
        path.append(chosen)
        tokens.append(tree.tokens[chosen])
        node = chosen


def accept_deterministic(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator, allowed: set[int] | None = None) -> Acceptance:
    """probs: [1 + n_nodes, vocab] target distributions (row 0 = root). Candidates are point masses."""

    def trial(c: int, residual: torch.Tensor):
        t = tree.tokens[c]
        if _uniform(generator) < residual[t].item():
            return True, residual
        residual[t] = 0.0  # a repeated candidate now has probability 0 and is never accepted
        return False, residual / residual.sum()

    return _walk(tree, probs, generator, trial, allowed)


def accept_with_draft_probs(
    tree: DraftTree,
    probs: torch.Tensor,  # [1 + n_nodes, vocab] target distributions, row 0 = root
    draft_probs: torch.Tensor,  # [n_nodes, vocab]: row i = the draft distribution node i was drawn from
    generator: torch.Generator,
    allowed: set[int] | None = None,
) -> Acceptance:
    """Recursive rejection sampling; children of a node must be i.i.d. draws from draft_probs."""

    def trial(c: int, residual: torch.Tensor):
        t, q = tree.tokens[c], draft_probs[c]  # q [vocab]
        if q[t] > 0 and _uniform(generator) < min(1.0, (residual[t] / q[t]).item()):
            return True, residual
        left = (residual - q).clamp_min(0)
        total = left.sum()
        # total == 0 means residual == q: nothing to correct, the residual stays as it is
        return False, (left / total if total > 0 else residual)

    return _walk(tree, probs, generator, trial, allowed)


_MASK64 = (1 << 64) - 1
SMALL_SUPPORT = 256  # up to this many tokens with a finite score, noise is hashed per token (gumbel_argmax)


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class PositionNoise:
    """Gumbel noise for each position of the sequence, a function of (seed, position) alone.

    Two forms, chosen by the size of the distribution's support, itself a function of the target's
    distribution only (so every method picks the same one at a position): `vector` draws the noise
    of the whole vocabulary from a generator seeded with (seed, position); `hashed` computes the
    noise of single tokens from (seed, position, token) by a counter-based hash, so that a cut
    distribution (top-k, top-p) costs a few evaluations instead of a draw over the vocabulary."""

    def __init__(self, seed: int):
        self.seed = 0 if _fault == "reused-noise" else int(seed)  # deliberately wrong (tests only): one noise for every seed

    def vector(self, position: int, vocab: int) -> torch.Tensor:  # -> [vocab]
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + position) % (2**63 - 1))
        u = torch.rand(vocab, generator=gen).clamp_min_(1e-20)  # (0, 1)
        return -torch.log(-torch.log(u))

    def hashed(self, position: int, token: int) -> float:
        key = _splitmix64(_splitmix64(self.seed & _MASK64) ^ (position & _MASK64))
        bits = _splitmix64(key ^ ((token * 0xD1B54A32D192ED03) & _MASK64))
        u = ((bits >> 11) + 0.5) / float(1 << 53)  # (0, 1)
        return -math.log(-math.log(u))

    __call__ = vector


def gumbel_argmax(scores: torch.Tensor, noise: PositionNoise, position: int) -> int:
    """argmax over tokens of scores + Gumbel noise of `position` (scores [vocab], -inf outside the
    support): an exact sample of softmax(scores)."""
    finite = torch.isfinite(scores)
    n = int(finite.sum())
    if n <= SMALL_SUPPORT:
        support = finite.nonzero().flatten()
        return _gumbel_argmax_of(support.tolist(), scores[support].tolist(), noise, position)
    return int((scores + noise.vector(position, scores.shape[-1]).to(scores.device)).argmax())


def _gumbel_argmax_of(tokens: list[int], values: list[float], noise: PositionNoise, position: int) -> int:
    """`gumbel_argmax` over a small support (at most SMALL_SUPPORT tokens), noise hashed per token."""
    return max(zip(tokens, values), key=lambda tv: tv[1] + noise.hashed(position, tv[0]))[0]


def accept_by_position_noise(tree: DraftTree, scores, noise: PositionNoise, position: int, allowed: set[int] | None = None) -> Acceptance:
    """The deterministic rule with coupled randomness: at the node deciding sequence position t,
    x = argmax(log p + Gumbel noise of t) is an exact sample of p (Gumbel-max); the child holding x
    is accepted, or x is the recovered / bonus token. Child i is then accepted with probability
    p(c_i) given that c_1..c_{i-1} were not, i.e. r(c_i) under the residual of
    `accept_deterministic`: the same distribution of outcomes. Because x depends only on the seed,
    the position and p, a seed gives the same text whatever the drafter proposed.

    scores: [1 + n_nodes, vocab], log p up to a constant per row (a tensor such as log-probabilities,
    or a `RowScores` that warps the rows it is asked for); position: the sequence index of the
    token after the root.
    """
    children = tree.children(allowed)
    node, path, tokens = ROOT, [], []
    while True:
        t = len(path) if _fault == "noise-by-row" else position + len(path)  # the fault: keyed by depth in the step
        x = scores.sample(node + 1, noise, t) if isinstance(scores, RowScores) else gumbel_argmax(scores[node + 1].cpu(), noise, t)
        tokens.append(x)
        kids = children[node + 1]
        nxt = next((c for c in kids if tree.tokens[c] == x), None)
        if nxt is None:
            return Acceptance(path, tokens, recovered=bool(kids))
        path.append(nxt)
        node = nxt


def accept(
    tree: DraftTree,
    logits: torch.Tensor,  # [1 + n_nodes, vocab]
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    draft_probs: torch.Tensor | None = None,  # [n_nodes, vocab]
    noise: PositionNoise | None = None,
    position: int = 0,
    allowed: set[int] | None = None,
) -> Acceptance:
    """The rule for this step: greedy; sampling with draft probabilities (recursive rejection);
    sampling of point-mass candidates (Gumbel-coupled, or the residual rule without `noise`)."""
    if cfg.greedy:
        return greedy_accept(tree, logits, allowed)
    if draft_probs is not None and len(tree):
        return accept_with_draft_probs(tree, target_probs(logits, cfg), draft_probs, generator, allowed)
    if noise is not None:
        return accept_by_position_noise(tree, RowScores(logits, cfg), noise, position, allowed)
    return accept_deterministic(tree, target_probs(logits, cfg), generator, allowed)


# -- for tests only ---------------------------------------------------------------------------
# Deliberately wrong variants of the sampling path that runs in production, which the end-to-end
# distribution tests (tests/test_sampling_e2e.py) must reject: they show those tests can fail.
#   noise-by-row   the coupled noise keyed by the node's depth within a step, not its position
#   warp-order     top-k and top-p cut before the temperature is applied
#   reused-noise   one noise sequence for every seed (as a generator reused across requests)
#   cuts-after-noise  top-k and top-p applied to the noisy scores, where they never change the argmax
FAULTS = ("noise-by-row", "warp-order", "reused-noise", "cuts-after-noise")
_fault: str | None = None


@contextmanager
def injected_fault(name: str):
    """Run the block with the sampling fault `name` (one of FAULTS). Tests only."""
    global _fault
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; one of {FAULTS}")
    _fault = name
    try:
        yield
    finally:
        _fault = None
