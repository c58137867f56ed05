"""EAGLE and ConFu: a trained draft head over the target's own features (see draft_head.py).

`eagle` (EAGLE-2's dynamic tree over an EAGLE-3-style head) and `confu` (the same head guided by
contemplate tokens, arXiv 2603.08899) are one drafter; `confu` also asks the target for k
contemplate rows in every verification forward.

Per step (no extra target forward; the head is one layer):

1. catch up: the target rows committed by the last step (the accepted path, or the whole prompt
   on the first step) enter the head's cache as (fused features of position p, token p + 1); the
   last of them predicts depth 1 below the root.
2. grow (EAGLE-2): at every depth the `branching` best new nodes by cumulative log-probability
   are expanded, each with its `branching` best children, through one head pass over those nodes
   (tree attention inside the head), up to `depth` levels.
3. select: the best nodes by cumulative probability form the tree: a fixed `budget`, or with
   `budget="auto"` the size that maximises tokens per second on this machine (budget.py), as ESP.
4. confu: k contemplate rows after the root and after every node of the best chain (or of every
   node) ride along in the verification; the rows after the node that ends up last accepted give
   the plan for the next step.

The target decides every token (tree verification), so the output is the target's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.budget import AutoBudget, parse_budget
from ..engine.protocol import Drafter, Proposal, StepResult
from ..engine.tree import ROOT, AuxRows, DraftTree, Layout
from ..errors import InvalidOptionError
from ..heads.draft_head import DraftHead, target_features


def head_config(spec):
    """The config of the head `spec` (a directory or a DraftHead): a clear error, before any model
    loads, for a missing head or a directory that holds none."""
    if spec is None:
        raise InvalidOptionError("methods eagle and confu need a trained head: pass --head DIR (API: head=DIR), a directory written by `specprobe train-head`")
    return spec.config if isinstance(spec, DraftHead) else DraftHead.read_config(spec)


@dataclass
class _HeadRunner:
    """A head ready to draft for one target: its kernel-planned copy and its vocabulary head."""

    head: DraftHead  # the trained head itself (weights)
    runner: DraftHead  # a copy sharing its weights whose linear layers run this machine's kernel plans
    lm_head: object  # the target's LM head restricted to the head's draft vocabulary, with its kernel plan


def head_runner(target, spec) -> _HeadRunner:
    """The head `spec` (a directory or a DraftHead) prepared for `target`, built once per target
    and head and kept in the target's drafter state."""
    key = ("eagle-head", spec if isinstance(spec, DraftHead) else str(Path(spec).resolve()))
    store = target.drafter_state()
    if key not in store:
        head = spec if isinstance(spec, DraftHead) else DraftHead.load(spec)
        head.check_target(target)  # before any kernel timing for a head that cannot run
        vocabulary = target.tuned_head(head.vocabulary_weight(target.head.weight).contiguous(), target.head.softcap)
        store[key] = _HeadRunner(head, target.tuned_module(head), vocabulary)
    return store[key]


@dataclass
class EagleConfig:
    head: object = field(default=None, repr=False)  # a directory written by `specprobe train-head`, or a DraftHead
    budget: int | str = "auto"  # tree nodes per step, or auto (budget.py)
    max_budget: int = 16  # the largest tree auto considers
    depth: int = 5  # head passes per step: the deepest draft
    branching: int = 2  # nodes expanded per depth and children per expanded node
    contemplate_after: str = "chain"  # confu: contemplate rows after the root and "chain" (the best path) or "all" nodes
    min_path_prob: float = 0.02  # stop growing when no new node's path probability reaches this

    def __post_init__(self):
        self.budget = parse_budget(self.budget)
        for name in ("max_budget", "depth", "branching"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"eagle option {name} must be an integer >= 1, got {value!r}")
        if self.contemplate_after not in ("chain", "all"):
            raise InvalidOptionError(f"contemplate_after must be 'chain' or 'all', got {self.contemplate_after!r}")
        if not isinstance(self.min_path_prob, (int, float)) or not 0.0 <= self.min_path_prob < 1.0:
            raise InvalidOptionError(f"eagle option min_path_prob must be in [0, 1), got {self.min_path_prob!r}")
        self.head_config = head_config(self.head)


@dataclass
class _Node:
    token: int
    parent: int  # index into the node list, or ROOT
    logp: float  # cumulative log-probability
    depth: int
    source: int  # the head row (in this step's draft rows, -1 = the last committed row) that predicted it


class EagleDrafter(Drafter):
    name = "eagle"
    uses_contemplate = False

    def __init__(self, config: EagleConfig | None = None, **options):
        self.config = config or EagleConfig(**options)
        if self.uses_contemplate and not self.config.head_config.contemplate:
            raise InvalidOptionError("method confu needs a head trained with contemplate tokens (train-head --contemplate)")

    def start(self, session) -> None:
        self.target = session.target
        if not getattr(self.target, "supports_hidden_states", False):
            raise InvalidOptionError(f"methods eagle and confu read the target's hidden states, which the {self.target.name} backend does not expose")
        prepared = head_runner(self.target, self.config.head)
        self.head = prepared.runner
        self.dtype = next(self.head.parameters()).dtype
        c = self.head.config
        self.keys = torch.zeros(c.num_kv_heads, 0, c.head_dim, dtype=self.dtype)  # [kv_heads, committed rows, d]
        self.values = torch.zeros_like(self.keys)
        self.new_features: torch.Tensor | None = None  # [m, 3h] of positions not yet in the head's cache
        self.last_high: torch.Tensor | None = None  # [h]: top feature of the last position with features
        self.plan_features: torch.Tensor | None = None  # [k, 3h]: contemplate rows after the last accepted node
        self.auto = AutoBudget(self.target, kind=self.name, session=session) if self.config.budget == "auto" else None
        self.lm_head = prepared.lm_head
        self.broken = False

    def _head_step(self, features, tokens, positions, visible, past, plan=None):
        """One head pass over rows (features, next tokens) after the cached rows `past`."""
        embeds = self.target.embed(tokens).to(self.dtype)  # [n, h]
        return self.head.step(features, embeds, positions, visible, past, plan)

    def _plan(self, depth: int) -> torch.Tensor | None:
        if self.plan_features is None:
            return None
        return self.head.plan_vectors(self.plan_features[min(depth, len(self.plan_features)) - 1])  # [h]

    def _top(self, normed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities [n, k], target token ids [n, k]) of the k best draft tokens per row."""
        logits = self.lm_head(normed.to(self.lm_head.weight.dtype))  # [n, draft_vocab]
        top = torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)
        return top.values, self.head.vocab_ids[top.indices]

    @torch.inference_mode()
    def propose(self, session) -> Proposal:
        cfg = self.config
        if self.new_features is None or self.broken:
            return Proposal(needs_hidden_states=True)
        # 1. catch up: committed positions C .. C+m-1, each with its next (committed) token
        C, m = self.keys.shape[1], self.new_features.shape[0]
        next_tokens = session.ids[C + 1 : C + 1 + m]
        positions = torch.arange(C, C + m)
        visible = torch.ones(m, C + m, dtype=torch.bool)
        visible[:, C:] = torch.tril(torch.ones(m, m, dtype=torch.bool))
        plan = self._plan(1)
        plans = None if plan is None else torch.cat([torch.zeros(m - 1, plan.shape[0]), plan[None]])
        fused = self.head.fuse_features(*self.new_features.to(self.dtype).chunk(3, dim=-1))
        out, normed, (k, v) = self._head_step(fused, next_tokens, positions, visible, (self.keys, self.values), plans)
        self.keys, self.values = torch.cat([self.keys, k], 1), torch.cat([self.values, v], 1)
        self.new_features = None
        C += m
        # 2. grow the tree, EAGLE-2 style
        nodes: list[_Node] = []
        draft_keys, draft_values, row_of = [], [], {}  # the draft rows of this step, and the row of each expanded node
        values, ids = self._top(normed[-1:], cfg.branching)
        outputs = {-1: out[-1]}
        frontier = [len(nodes) + i for i in range(cfg.branching)]
        nodes += [_Node(t, ROOT, s, 1, -1) for t, s in zip(ids[0].tolist(), values[0].tolist())]
        cutoff = math.log(cfg.min_path_prob) if cfg.min_path_prob > 0 else -math.inf
        for depth in range(2, cfg.depth + 1):
            expand = [i for i in sorted(frontier, key=lambda i: -nodes[i].logp)[: cfg.branching] if nodes[i].logp >= cutoff]
            if not expand:
                break
            n = len(expand)
            feats = torch.stack([outputs[nodes[i].source] for i in expand])  # [n, h]
            tokens = [nodes[i].token for i in expand]
            past_draft = len(row_of)  # draft rows so far: one per expanded node
            visible = torch.zeros(n, C + past_draft + n, dtype=torch.bool)
            visible[:, :C] = True
            for r, i in enumerate(expand):
                a = nodes[i].parent
                while a != ROOT:  # the rows of its expanded ancestors
                    visible[r, C + row_of[a]] = True
                    a = nodes[a].parent
                visible[r, C + past_draft + r] = True
            positions = torch.tensor([C - 1 + nodes[i].depth for i in expand])
            past = (torch.cat([self.keys, *draft_keys], 1), torch.cat([self.values, *draft_values], 1))
            plan = self._plan(depth)
            plans = None if plan is None else plan[None].expand(n, -1)
            out, normed, (k, v) = self._head_step(feats, tokens, positions, visible, past, plans)
            draft_keys.append(k)
            draft_values.append(v)
            values, ids = self._top(normed, cfg.branching)  # [n, branching] each
            frontier = []
            for r, i in enumerate(expand):
                row_of[i] = past_draft + r
                outputs[past_draft + r] = out[r]
                for t, s in zip(ids[r].tolist(), values[r].tolist()):
                    frontier.append(len(nodes))
                    nodes.append(_Node(t, i, nodes[i].logp + s, depth, past_draft + r))
        # 3. select the best nodes (a child never scores above its parent: the best n form a tree)
        order = sorted(range(len(nodes)), key=lambda i: (-nodes[i].logp, i))[: cfg.max_budget if self.auto else cfg.budget]
        tree, index, scores = DraftTree(), {}, []
        for i in order:
            index[i] = tree.add(nodes[i].token, ROOT if nodes[i].parent == ROOT else index[nodes[i].parent])
            scores.append(math.exp(nodes[i].logp))
        if self.auto is not None:
            n = self.auto.size(scores, tree.depths(), rows=lambda n: Layout.rows_of(n, self._aux_count(tree.prefix(n))))
            tree, scores = tree.prefix(n), scores[:n]
        self.scores = scores
        aux = self._contemplate_rows(tree) if self.uses_contemplate else None
        return Proposal(tree, aux, needs_hidden_states=True)

    # -- confu -------------------------------------------------------------------------------
    def _anchors(self, tree: DraftTree) -> list[int]:
        if self.config.contemplate_after == "all":
            return [ROOT, *range(len(tree))]
        chain, node = [ROOT], ROOT  # the best path: the first child at every level (nodes are best-first)
        children = tree.children()
        while children[node + 1]:
            node = children[node + 1][0]
            chain.append(node)
        return chain

    def _aux_count(self, tree: DraftTree) -> int:
        return len(self._anchors(tree)) * self.head.config.contemplate if self.uses_contemplate else 0

    def _contemplate_rows(self, tree: DraftTree) -> AuxRows | None:
        if self.last_high is None:
            return None
        k = self.head.config.contemplate
        embeds = self.head.contemplate_embeds(self.last_high.to(self.dtype)[None])[0]  # [k, h]
        anchors, offsets, sees, rows = [], [], [], []
        for a in self._anchors(tree):
            base = len(anchors)
            for j in range(k):
                anchors.append(a)
                offsets.append(j + 1)
                sees.append(tuple(range(base, base + j)))
                rows.append(embeds[j])
        return AuxRows(torch.stack(rows).to(self.target.dtype), anchors, offsets, sees)

    # -- observe -----------------------------------------------------------------------------
    @torch.inference_mode()
    def observe(self, session, step: StepResult) -> None:
        out = step.output
        tree = step.proposal.tree
        if self.auto is not None and len(tree) and len(self.scores) == len(tree):
            self.auto.observe_scores(self.scores, tree.parents, step.acceptance.path)
        if step.drafts_dropped or out.hidden_states is None:  # the loop dropped the proposal (end of context): no features
            self.broken = True
            return
        layout = out.layout
        path = step.acceptance.path
        rows = list(range(layout.n_pending)) + [layout.tree_row(i) for i in path]
        C = self.keys.shape[1]
        rows = rows[: max(0, len(session.ids) - 1 - C)]  # positions whose next token is committed
        layers = self.head.config.feature_layers
        self.new_features = target_features(out.hidden_states, layers, rows).float() if rows else None
        self.last_high = out.hidden_states[layers[2]][0, rows[-1]].float() if rows else None
        self.plan_features = None
        aux = step.proposal.aux
        if self.uses_contemplate and aux is not None:
            last = path[-1] if path else ROOT
            mine = [j for j, a in enumerate(aux.anchor) if a == last]
            if mine:
                self.plan_features = target_features(out.hidden_states, layers, [layout.aux_row(j) for j in mine]).float()


class ConfuDrafter(EagleDrafter):
    name = "confu"
    uses_contemplate = True
