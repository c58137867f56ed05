"""OmniDraft (arXiv 2507.02659), first slice: one small drafter for a target with a DIFFERENT tokenizer.

The drafter reads the committed text in its own tokenization, drafts a chain of its tokens
greedily, and the vocabulary bridge (vocab_bridge.py: online n-gram cache, direct map,
re-tokenisation) turns them into target tokens, which the target verifies as a chain. After each
step the bridge learns, from the text the target committed, which runs of draft tokens make one
target token.

Draft length (after SpecDec++, arXiv 2405.19715): an online logistic model predicts, from a draft
token's probability and its depth, whether the target will accept it; drafting stops when the
predicted probability that the whole chain so far is accepted falls below `stop_below`. The model
learns after every step from the tokens the target tested (accepted ones, and the first rejected).

Draft KV cache: the committed text is re-tokenised by the drafter every step (a target token can
end in the middle of a draft token); the cache keeps the longest prefix of draft tokens that did
not change (`kv_cache.keep_rows`), so only the tail is fed again.

`draft_layers=N` drafts with the drafter's first N layers and its head (a cheaper drafter).

Not in this slice (issue 6): online distillation of the drafter.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidOptionError
from ..kv_cache import keep_rows, new_cache
from ..models import LoadedModel, truncated_model
from ..tree import DraftTree
from ..verify import Target
from ..vocab_bridge import NGramCache, VocabularyBridge
from .base import Drafter, Proposal, StepResult

LEARN_WINDOW = 64  # target tokens of committed text the bridge learns from after each step

# What one (draft tokenizer, target tokenizer) pair keeps across generations, and truncated drafters;
# weakly keyed: they go with their tokenizers and models.
_PAIRS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # draft tokenizer -> {target tokenizer -> _Pair}
_TRUNCATED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {n_layers -> truncated model}


def _truncated(model, n_layers: int):
    """The drafter's first n layers and its head (models.truncated_model), built once."""
    per_model = _TRUNCATED.setdefault(model, {})
    if n_layers not in per_model:
        per_model[n_layers] = truncated_model(model, n_layers)
    return per_model[n_layers]


class AcceptancePredictor:
    """P(accept) = sigmoid(w . [1, p, log p, depth]) for a draft token of probability p at depth
    `depth` (1 = first), trained online by one gradient step per observed token.

    >>> m = AcceptancePredictor()
    >>> for _ in range(200):
    ...     m.update(0.9, 1, True)
    ...     m.update(0.1, 1, False)
    >>> m(0.9, 1) > 0.8 > 0.2 > m(0.1, 1)
    True
    """

    def __init__(self, lr: float = 0.1):
        self.w = [1.0, 2.0, 0.0, -0.2]  # prior: confident tokens are accepted, deeper ones less
        self.lr = lr

    @staticmethod
    def _x(p: float, depth: int) -> list[float]:
        return [1.0, p, math.log(max(p, 1e-6)) / 5.0, depth / 5.0]

    def __call__(self, p: float, depth: int) -> float:
        z = sum(w * x for w, x in zip(self.w, self._x(p, depth)))
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def update(self, p: float, depth: int, accepted: bool) -> None:
        g = (1.0 if accepted else 0.0) - self(p, depth)
        self.w = [w + self.lr * g * x for w, x in zip(self.w, self._x(p, depth))]


@dataclass
class _Pair:
    bridge: VocabularyBridge
    predictor: AcceptancePredictor  # keeps learning across generations


@dataclass
class OmniDraftConfig:
    draft_model: object = field(default=None, repr=False)  # a LoadedModel (model and tokenizer), any vocabulary
    num_tokens: int = 4  # draft tokens per step (at most)
    stop_below: float = 0.3  # stop drafting when the predicted chance that the chain is accepted falls below this
    ngram_cache: str | None = None  # a JSON file: the bridge's n-gram cache is loaded from it (if present) and saved to it
    draft_layers: int | None = None  # draft with only the drafter's first N layers (and its head): a faster drafter

    def __post_init__(self):
        if not isinstance(self.draft_model, LoadedModel):
            raise InvalidOptionError("method 'omnidraft' needs draft_model=<a LoadedModel> (specprobe.load(name)): the drafter's tokenizer is needed")
        if self.draft_layers is not None:
            n_layers = self.draft_model.model.config.num_hidden_layers
            if not isinstance(self.draft_layers, int) or isinstance(self.draft_layers, bool) or not 1 <= self.draft_layers <= n_layers:
                raise InvalidOptionError(f"omnidraft option draft_layers must be an integer in [1, {n_layers}], got {self.draft_layers!r}")
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or self.num_tokens < 1:
            raise InvalidOptionError(f"omnidraft option num_tokens must be an integer >= 1, got {self.num_tokens!r}")
        if not isinstance(self.stop_below, (int, float)) or not 0.0 <= self.stop_below < 1.0:
            raise InvalidOptionError(f"omnidraft option stop_below must be in [0, 1), got {self.stop_below!r}")


class OmniDraftDrafter(Drafter):
    name = "omnidraft"

    def __init__(self, config: OmniDraftConfig | None = None, **options):
        self.config = config or OmniDraftConfig(**options)
        model = self.config.draft_model.model
        if self.config.draft_layers is not None and self.config.draft_layers < model.config.num_hidden_layers:
            model = _truncated(model, self.config.draft_layers)
        self.draft = Target.of(model)
        self.draft_tokenizer = self.config.draft_model.tokenizer
        self.target_tokenizer = None

    def set_tokenizer(self, tokenizer) -> None:
        """The target's tokenizer (the API passes it before generation starts)."""
        self.target_tokenizer = tokenizer

    def start(self, session) -> None:
        if self.target_tokenizer is None:
            raise InvalidOptionError("omnidraft needs the target's tokenizer: run it through specprobe.generate")
        per_target = _PAIRS.setdefault(self.draft_tokenizer, weakref.WeakKeyDictionary())
        if self.target_tokenizer not in per_target:
            path = self.config.ngram_cache
            cache = NGramCache.load(path) if path and Path(path).is_file() else None
            per_target[self.target_tokenizer] = _Pair(VocabularyBridge(self.draft_tokenizer, self.target_tokenizer, cache), AcceptancePredictor())
        pair = per_target[self.target_tokenizer]
        self.bridge, self.predictor = pair.bridge, pair.predictor
        self.last: tuple[list[float], list[int]] | None = None  # (draft probabilities, draft tokens per target token)
        self.cache = new_cache()
        self.fed: list[int] = []  # draft tokens whose rows are in the draft cache, in order
        self.prompt_len = len(session.ids)

    def _text(self, target_ids: list[int]) -> str:
        return self.target_tokenizer.decode(target_ids, skip_special_tokens=True)

    @torch.inference_mode()
    def propose(self, session) -> Proposal:
        cfg = self.config
        context = self.draft_tokenizer(self._text(session.ids), add_special_tokens=False).input_ids
        if not context:
            return Proposal()
        common = 0
        while common < min(len(context), len(self.fed)) and context[common] == self.fed[common]:
            common += 1
        common = min(common, len(context) - 1)  # feed at least one token
        room = self.draft.max_length - len(context) - 1
        if room < 1:
            return Proposal()
        keep_rows(self.cache, common, [])
        self.fed = context[:common]
        feed, drafted, probs = context[common:], [], []
        chain = 1.0  # predicted probability that every draft token so far is accepted
        for depth in range(1, min(cfg.num_tokens, room) + 1):
            logits = self.draft.forward(self.cache, feed, DraftTree()).logits[0]  # [draft vocab]
            self.fed += feed
            p = torch.softmax(logits.float(), dim=-1)
            token = int(p.argmax())
            drafted.append(token)
            probs.append(float(p[token]))
            chain *= self.predictor(probs[-1], depth)
            if chain < cfg.stop_below:
                break
            feed = [token]
        bridged = self.bridge.to_target(drafted, probs)
        self.last = (probs, bridged.draft_used[: cfg.num_tokens])
        return Proposal(DraftTree.chain(bridged.target_ids[: cfg.num_tokens]))

    def observe(self, session, step: StepResult) -> None:
        self._learn_acceptance(len(step.acceptance.path))
        generated = session.ids[self.prompt_len :]
        window = generated[-LEARN_WINDOW:]
        texts = self.bridge.target_texts
        if window and all(0 <= t < len(texts) and texts[t] is not None for t in window):
            try:
                text = b"".join(texts[t] for t in window).decode("utf-8")
            except UnicodeDecodeError:  # the window starts or ends inside a character
                return
            self.bridge.learn(self.draft_tokenizer(text, add_special_tokens=False).input_ids, window)

    def _learn_acceptance(self, n_accepted: int) -> None:
        """Draft tokens whose target tokens were all accepted count as accepted; the draft token
        of the first rejected target token as rejected; later ones were not tested."""
        if self.last is None:
            return
        probs, used = self.last
        self.last = None
        if not used or 0 in used:  # re-tokenised text: no token-to-token correspondence
            return
        d = 0
        for k, n in enumerate(used):
            accepted = k < n_accepted
            for _ in range(n):
                if d < len(probs):
                    self.predictor.update(probs[d], d + 1, accepted)
                d += 1
            if not accepted:
                return

    def finish(self) -> None:
        """Save the n-gram cache where `ngram_cache` says."""
        if self.config.ngram_cache:
            self.bridge.cache.save(self.config.ngram_cache)
