"""ESP: embedding-space probing, training-free multi-token drafts (arXiv 2603.17942).

The target is asked about the future through soft "mask" vectors placed in its own input
embedding space. After a real token at position p, k mask rows sit at p+1 .. p+k; the logits of
mask j predict the token at p+1+j, i.e. depth j below the NEXT step's root (the token that the
real row at p predicts). No weights change and there is no draft model.

Masks ride along in the verification forward as auxiliary rows: a chain of k masks follows the
root and every tree node, so whichever node ends up last accepted, the drafts of the next step
are already computed (no extra model call). No real token attends to a mask, so the target's
output is unchanged.

Drafting a tree (the paper's dynamic tree): depth d takes its candidates from mask d's top-K,
skipping a candidate equal to its parent's token (untrained masks often re-predict the token of
their own slot) in favour of the next best; the tree grows best-first by the product of the
candidates' probabilities until it holds `budget` nodes.

Mask vector (`mask_init`):
  context-mean  mean of the embeddings of every committed token (prompt and generated), updated
                as tokens are committed (the paper's initialisation)
  ema           the prompt's mean, then m <- (1 - lambda) m + lambda e(token) per new token
  vocab-mean    mean of the embeddings of the whole vocabulary (fixed)
  gaussian      one fixed draw (seed 0) from a Gaussian with the vocabulary embeddings' per-dimension
                mean and standard deviation
  token:ID      the embedding of one token (an id, or a token string)
All masks of a chain share the vector; their positions differ (RoPE tells them apart).

Two constructions of this project's own (no published method uses them), both soft embeddings
built from the distributions the previous step's masks predicted, which cost no forward:
  soft-prev     one vector for every mask: the expected input embedding under the first mask's
                last distribution, E^T p, over its SOFT_TOKENS most likely tokens, the rest of the
                probability mass given to the vocabulary mean (vocab-mean before the first step)
  slot-mix      a vector per mask: the mask after a node at depth d, offset j, sits in the slot of
                depth d + j, whose token the previous step's mask d + j guessed; its vector is that
                guess's expected embedding (as in soft-prev); vocab-mean where no mask guessed it
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..engine.budget import AutoBudget, parse_budget
from ..engine.protocol import Drafter, Proposal, StepResult
from ..engine.tree import ROOT, AuxRows, DraftTree, Layout
from ..errors import InvalidOptionError

MASK_INITS = ("context-mean", "ema", "vocab-mean", "gaussian", "soft-prev", "slot-mix", "token:<id>")
SOFT_TOKENS = 64  # tokens of a mask distribution that soft-prev and slot-mix mix


@dataclass
class ESPConfig:
    """ESP options. The defaults are the fastest setting measured on a 2-core CPU, where a forward
    of q rows costs far more than one of a single row (README, "Measured on this machine"); on a
    GPU, where extra rows are nearly free, larger trees (masks=3, branching=4, budget=8 or more) pay.
    `vocab-mean` gave the highest tau on SmolLM2 and tied with the paper's context mean on Gemma3.
    """

    masks: int = 1  # k: mask rows after each node; drafts reach depth k
    branching: int = 2  # K: candidates per depth and children per node
    budget: int | str = "auto"  # tree nodes per step; auto: the size that maximises tokens/s (budget.py)
    max_budget: int = 16  # the largest tree auto considers
    mask_init: str = "vocab-mean"
    ema_lambda: float = 0.1

    def __post_init__(self):
        self.budget = parse_budget(self.budget)
        for name in ("masks", "branching", "max_budget"):
            if int(getattr(self, name)) < 1:
                raise InvalidOptionError(f"ESP option {name} must be >= 1, got {getattr(self, name)}")
        if not (0.0 < self.ema_lambda <= 1.0):
            raise InvalidOptionError(f"ESP option ema_lambda must be in (0, 1], got {self.ema_lambda}")
        if self.mask_init not in MASK_INITS[:-1] and not self.mask_init.startswith("token:"):
            raise InvalidOptionError(f"unknown mask_init {self.mask_init!r}; choose from {', '.join(MASK_INITS)}")


@dataclass
class DepthCandidates:
    tokens: list[int]  # sorted by probability, best first
    probs: list[float]


def build_tree(root_token: int, depths: list[DepthCandidates], budget: int, branching: int) -> DraftTree:
    """Best-first tree over per-depth candidate lists (see `ranked_tree`)."""
    return ranked_tree(root_token, depths, budget, branching)[0]


def ranked_tree(root_token: int, depths: list[DepthCandidates], budget: int, branching: int) -> tuple[DraftTree, list[float]]:
    """Best-first tree over per-depth candidate lists, and each node's score, in node order
    (which is best-first order: the first n nodes of the tree are the best tree of n nodes).

    A node's children are the first `branching` candidates of the next depth that differ from the
    node's own token; a child's score is its parent's score times its probability.

    Example: root 7, depth 1 = [7 (0.5), 3 (0.3), 4 (0.1)], depth 2 = [3 (0.5), 9 (0.25)],
    budget 3, branching 2. Depth 1 skips 7 (equal to the root): children 3 (0.3) and 4 (0.1).
    Best-first: 3 (0.3), then 4 (0.1), then 9 under 3 (0.3 * 0.25 = 0.075; 3 itself is skipped
    under 3) beats 3 under 4 (0.1 * 0.5 = 0.05):

    >>> d = [DepthCandidates([7, 3, 4], [0.5, 0.3, 0.1]), DepthCandidates([3, 9], [0.5, 0.25])]
    >>> t = build_tree(7, d, budget=3, branching=2)
    >>> t.tokens, t.parents
    ([3, 4, 9], [-1, -1, 0])
    """
    tree, scores = DraftTree(), []
    if not depths or budget <= 0:
        return tree, scores

    def children_of(parent_token: int, depth: int) -> list[tuple[int, float]]:
        c = depths[depth - 1]
        return [(t, p) for t, p in zip(c.tokens, c.probs) if t != parent_token][:branching]

    # heap entries: (-score, order, parent node, depth, sibling list, rank in it, parent score)
    order = 0
    heap: list = []
    first = children_of(root_token, 1)
    if first:
        heapq.heappush(heap, (-first[0][1], order, ROOT, 1, first, 0, 1.0))
    while heap and len(tree) < budget:
        neg, _, parent, depth, sibs, rank, pscore = heapq.heappop(heap)
        token, _ = sibs[rank]
        node = tree.add(token, parent)
        scores.append(-neg)
        if rank + 1 < len(sibs):  # the next sibling
            order += 1
            heapq.heappush(heap, (-pscore * sibs[rank + 1][1], order, parent, depth, sibs, rank + 1, pscore))
        if depth < len(depths):  # the first child
            kids = children_of(token, depth + 1)
            if kids:
                order += 1
                heapq.heappush(heap, (neg * kids[0][1], order, node, depth + 1, kids, 0, -neg))
    return tree, scores


class ESPDrafter(Drafter):
    name = "esp"

    def __init__(self, config: ESPConfig | None = None, **options):
        self.config = config or ESPConfig(**options)

    # -- mask vector -------------------------------------------------------------------------
    def _fixed_mask(self, session) -> torch.Tensor | None:
        init = self.config.mask_init
        if init in ("vocab-mean", "soft-prev", "slot-mix"):  # the last two until a step has run
            return session.target.embedding_stats()[0]
        if init == "gaussian":  # one fixed draw from N(mean, std^2) of the vocabulary's embeddings
            mean, std = session.target.embedding_stats()
            return mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
        if init.startswith("token:"):
            spec = init.split(":", 1)[1]
            tok = session.tokenizer
            if spec.lstrip("-").isdigit():
                tid = int(spec)
            elif tok is not None and spec in tok.get_vocab():
                tid = tok.get_vocab()[spec]
            else:
                raise InvalidOptionError(f"mask_init {init!r}: not a token id or a token of this vocabulary")
            if not 0 <= tid < session.target.vocab_size:
                raise InvalidOptionError(f"mask_init {init!r}: token id out of range")
            return session.target.embed([tid])[0].float()
        return None

    def start(self, session) -> None:
        if self.config.branching + 1 > session.target.vocab_size:
            raise InvalidOptionError(f"ESP option branching ({self.config.branching}) must be below the vocabulary size ({session.target.vocab_size})")
        self.depths: list[DepthCandidates] = []
        self.slot_vectors: list[torch.Tensor] = []  # slot-mix: the expected embedding of depth i + 1's token [hidden]
        if self.config.budget == "auto":
            self.auto = AutoBudget(session.target, kind=self.name, session=session)
        prompt = session.target.embed(session.ids).float()  # [prompt_len, hidden]
        self.sum = prompt.sum(0)
        self.count = prompt.shape[0]
        fixed = self._fixed_mask(session)
        self.mask = fixed if fixed is not None else self.sum / self.count

    def _update_mask(self, session, tokens: list[int]) -> None:
        init = self.config.mask_init
        if init not in ("context-mean", "ema") or not tokens:
            return
        e = session.target.embed(tokens).float()  # [t, hidden]
        if init == "context-mean":
            self.sum += e.sum(0)
            self.count += e.shape[0]
            self.mask = self.sum / self.count
        else:
            lam = self.config.ema_lambda
            for row in e:
                self.mask = (1 - lam) * self.mask + lam * row

    # -- protocol ----------------------------------------------------------------------------
    def propose(self, session) -> Proposal:
        cfg = self.config
        root = session.pending[-1]
        branching = cfg.branching if getattr(session.target, "verifies_trees", True) else 1  # a chains-only backend: the best path
        if cfg.budget == "auto":
            tree, scores = ranked_tree(root, self.depths, cfg.max_budget, branching)
            n = self.auto.size(scores, tree.depths(), rows=lambda n: Layout.rows_of(n, cfg.masks * (n + 1)))
            tree, self.scores = tree.prefix(n), scores[:n]
        else:
            tree = build_tree(root, self.depths, cfg.budget, branching)
        return Proposal(tree, self.mask_rows(session, tree))

    def mask_rows(self, session, tree: DraftTree, nodes: list[int] | None = None) -> AuxRows:
        """A chain of k mask rows after the root and after every node of `tree` (or of `nodes`)."""
        anchors, offsets, sees = [], [], []
        for a in [ROOT, *(range(len(tree)) if nodes is None else nodes)]:
            base = len(anchors)
            for j in range(self.config.masks):
                anchors.append(a)
                offsets.append(j + 1)
                sees.append(tuple(range(base, base + j)))
        if self.config.mask_init == "slot-mix" and self.slot_vectors:
            depth = [0, *tree.depths()]  # of the root and of each node
            slot = [depth[a + 1] + o - 1 for a, o in zip(anchors, offsets)]  # index into slot_vectors
            embeds = torch.stack([self.slot_vectors[i] if i < len(self.slot_vectors) else self.mask for i in slot])
            return AuxRows(embeds.to(session.target.dtype), anchors, offsets, sees)  # [m, hidden]
        embeds = self.mask.to(session.target.dtype).expand(len(anchors), -1)  # [m, hidden]
        return AuxRows(embeds, anchors, offsets, sees)

    def _expected_embedding(self, session, probs: torch.Tensor) -> torch.Tensor:
        """E^T p over the SOFT_TOKENS likeliest tokens of `probs` [vocab], the rest of the mass on
        the vocabulary mean: an embedding-space guess of the token a mask predicted [hidden]."""
        top = torch.topk(probs.float(), min(SOFT_TOKENS, probs.shape[-1]))
        mixed = top.values @ session.target.embed(top.indices.tolist()).float()  # [hidden]
        return mixed + (1.0 - float(top.values.sum())) * session.target.embedding_stats()[0]

    def observe(self, session, step: StepResult) -> None:
        self._update_mask(session, step.emitted)
        tree = step.proposal.tree
        if self.config.budget == "auto" and len(tree):
            self.auto.observe_scores(self.scores, tree.parents, step.acceptance.path)
        aux = step.proposal.aux
        if step.drafts_dropped or aux is None:  # no mask rows ran this step (the last token, or the end of the context)
            self.depths, self.slot_vectors = [], []
            return
        path = step.acceptance.path
        last = path[-1] if path else ROOT
        rows = [j for j, a in enumerate(aux.anchor) if a == last]
        if not rows:  # no masks after that node (the hybrid places masks after ESP's nodes only)
            self.depths, self.slot_vectors = [], []
            return
        probs = torch.softmax(step.output.aux_logits[rows].float(), dim=-1)  # [k, vocab]
        if self.config.mask_init == "soft-prev":
            self.mask = self._expected_embedding(session, probs[0])
        elif self.config.mask_init == "slot-mix":
            self.slot_vectors = [self._expected_embedding(session, row) for row in probs]
        top = torch.topk(probs, self.config.branching + 1, dim=-1)
        self.depths = [DepthCandidates(t, p) for t, p in zip(top.indices.tolist(), top.values.tolist())]
