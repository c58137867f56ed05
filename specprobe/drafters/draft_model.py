"""Draft-model speculation (Leviathan, Kalman, Matias 2023, arXiv 2211.17192; Chen et al. 2023,
arXiv 2302.01318), greedy form.

A smaller causal LM with the target's tokenizer (same vocabulary) drafts the next `num_tokens`
tokens greedily, one forward each, from its own KV cache; the target checks them all in its one
verification forward. The draft model runs through a backend of its own, of the target's kind
(`session.target.for_model`), so it uses exactly the engine's forward and mask code.

Draft cache bookkeeping. The drafter keeps its own `pending` list: the committed tokens not yet
in the draft cache (the prompt at first, then the bonus token and whatever the draft never fed).
A step feeds the draft `pending` and then each drafted token but the last:

    draft cache: [committed ... ][pending][t1 .. t(k-1)]      t_k is proposed but never fed

After the verdict the cache is cut back (`Backend.commit`) to the committed prefix plus the
accepted drafted tokens that it holds rows for; the committed tokens after those become the new
`pending`. So every committed token is processed by the draft exactly once, and always
`draft.cache_length(draft cache) + len(pending) == len(committed tokens)`.

Tree (`tree_top_k` = K > 1): at every depth the K best draft tokens are proposed; the best one
continues the chain, the K - 1 runners-up are leaves beside it (a token tree in its cheapest form:
still one draft forward per depth). When the target rejects the chain token at some depth but
agrees with a runner-up, that runner-up is accepted too: one token more per step.

Early stop (`min_confidence`): drafting stops after a token whose draft probability is below the
threshold (that token is still proposed; the forwards it would take to go deeper are saved).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.protocol import Drafter, Proposal, StepResult
from ..engine.sampling import target_probs
from ..engine.tree import ROOT, DraftTree
from ..errors import InvalidOptionError


@dataclass
class DraftModelConfig:
    draft_model: object = field(default=None, repr=False)  # a causal LM (or LoadedModel) with the target's vocabulary
    num_tokens: int = 5  # draft depth: draft forwards (and chain tokens) per step
    tree_top_k: int = 1  # tokens proposed per depth: 1 = a chain
    min_confidence: float = 0.0  # stop drafting after a token whose draft probability is below this

    def __post_init__(self):
        if hasattr(self.draft_model, "model") and hasattr(self.draft_model, "tokenizer"):  # a LoadedModel
            self.draft_model = self.draft_model.model
        if self.draft_model is None:
            raise InvalidOptionError("method 'draft' needs a draft model: pass draft_model=<a loaded causal LM>")
        if not (hasattr(self.draft_model, "forward") or hasattr(self.draft_model, "generation_config")):  # a torch module, or a llama.cpp model
            raise InvalidOptionError(
                f"draft_model must be a loaded causal LM (e.g. specprobe.load(name).model), got {type(self.draft_model).__name__}"
            )
        for name in ("num_tokens", "tree_top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"draft option {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.min_confidence, (int, float)) or not 0.0 <= self.min_confidence <= 1.0:
            raise InvalidOptionError(f"draft option min_confidence must be in [0, 1], got {self.min_confidence!r}")


@dataclass
class _Fed:
    """What the last `propose` fed the draft model, for `observe` to cut back."""

    past: int  # draft cache length before the step
    n_pending: int  # committed tokens fed first
    chain: list[int]  # tree node of the chain token at each depth; chain[:-1] were fed


class DraftModelDrafter(Drafter):
    name = "draft"

    def __init__(self, config: DraftModelConfig | None = None, **options):
        self.config = config or DraftModelConfig(**options)

    def start(self, session) -> None:
        self.draft = session.target.for_model(self.config.draft_model)
        if self.draft.vocab_size != session.target.vocab_size:
            raise InvalidOptionError(
                f"the draft model's vocabulary ({self.draft.vocab_size} tokens) differs from the target's "
                f"({session.target.vocab_size}): draft and target must share one tokenizer"
            )
        self.cache = self.draft.new_cache()
        self.pending: list[int] = list(session.ids)  # committed, not yet in the draft cache
        self.fed: _Fed | None = None

    def propose(self, session) -> Proposal:
        cfg = self.config
        past = self.draft.cache_length(self.cache)
        # the draft is fed pending + (depth - 1) drafted tokens; they must fit its context
        depth = min(cfg.num_tokens, self.draft.max_length - past - len(self.pending) + 1)
        if depth < 1:
            return Proposal()
        tree, chain, q_rows = DraftTree(), [], []
        feed, parent = self.pending, ROOT
        sampling = getattr(session, "sampling", None)
        sample = sampling is not None and not sampling.greedy
        for d in range(depth):
            logits = self.draft.forward(self.cache, feed, DraftTree()).logits[0]  # [vocab], after the last fed token
            if sample:  # i.i.d. draws from the draft's own (equally warped) distribution q
                q = target_probs(logits[None], sampling)[0]  # [vocab]
                tokens = torch.multinomial(q, cfg.tree_top_k, replacement=True, generator=session.generator).tolist()
                confidence = q[tokens[0]].item()
                q_rows += [q] * len(tokens)
            else:
                top = torch.topk(torch.softmax(logits, dim=-1), cfg.tree_top_k)  # best first
                tokens, confidence = top.indices.tolist(), top.values[0].item()
            chain.append(tree.add(tokens[0], parent))
            for runner_up in tokens[1:]:
                tree.add(runner_up, parent)
            if d == depth - 1 or confidence < cfg.min_confidence:
                break
            feed, parent = tokens[:1], chain[-1]
        self.fed = _Fed(past, len(self.pending), chain)
        return Proposal(tree, draft_probs=torch.stack(q_rows) if sample else None)

    def observe(self, session, step: StepResult) -> None:
        fed, self.fed = self.fed, None
        if fed is not None:  # cut the draft cache back to what was committed
            path = step.acceptance.path  # empty when the loop dropped the drafts (end of context)
            accepted = 0  # leading accepted chain tokens with a row in the draft cache
            while accepted < min(len(path), len(fed.chain) - 1, len(step.emitted)) and path[accepted] == fed.chain[accepted]:
                accepted += 1
            self.draft.commit(self.cache, fed.past, list(range(fed.n_pending + accepted)))
        self.pending = session.ids[self.draft.cache_length(self.cache) :]

    def finish(self, session) -> None:
        self.draft.release(self.cache)
