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
not change (`Backend.commit`), so only the tail is fed again.

`draft_layers=N` drafts with the drafter's first N layers and its head (a cheaper drafter).

Online distillation (distill.py): method `omnidraft` records, for every generated token, the
target's distribution over the directly mapped vocabulary (from the verification forward it ran
anyway), and after the request makes one LoRA update of the drafter with the hybrid loss, reusing
the drafter's KV cache of the prompt. `omnidraft-frozen` drafts with the same drafter, never
updated. What a (drafter, target) pair learns (n-gram cache, acceptance model, adapter) lasts as
long as the loaded drafter (it is kept in the drafter's backend's `drafter_state`, per method and
setting); `adapt_state=PATH` saves it after every request and loads it at the first one.
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...engine.protocol import Backend, Drafter, Proposal, StepResult
from ...engine.tree import DraftTree
from ...errors import InvalidOptionError
from ...store import atomic_write
from .distill import DistillConfig, OnlineDistiller, align_for_distillation
from .vocab_bridge import NGramCache, VocabularyBridge

LEARN_WINDOW = 64  # target tokens of committed text the bridge learns from after each step
STATE_VERSION = 1


def tokenizer_signature(tokenizer) -> tuple:
    """What tells two tokenizers apart, as a key (never id(), which Python reuses)."""
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))


def _bridge(store: dict, draft_tokenizer, target_tokenizer) -> VocabularyBridge:
    """A new bridge with an empty n-gram cache (the tokenizers' tables are computed once per
    drafter and target vocabulary, and kept in the drafter's `store`)."""
    key = ("vocab-bridge", tokenizer_signature(target_tokenizer))
    if key not in store:
        store[key] = VocabularyBridge(draft_tokenizer, target_tokenizer)
    bridge = copy.copy(store[key])
    bridge.cache = NGramCache()
    return bridge


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
class _State:
    """What one (drafter, target) pair learns across generations."""

    bridge: VocabularyBridge
    predictor: AcceptancePredictor
    draft: Backend  # runs the model that drafts: the adapted copy when there is an adapter
    distiller: OnlineDistiller | None = None
    shared_ids: tuple[torch.Tensor, torch.Tensor] | None = None  # (draft ids [n], target ids [n]) of the direct map

    def save(self, path: str, meta: dict) -> None:
        state = {"version": STATE_VERSION, "meta": meta, "predictor": self.predictor.w,
                 "ngram": self.bridge.cache.to_dict(), "distiller": self.distiller.state_dict() if self.distiller else None}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(path, buffer.getvalue())  # never a half-written state file, never two writers at once

    def load(self, path: str, meta: dict) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
            raise InvalidOptionError(f"cannot read the adapt state {path}: not a file torch.load reads ({type(e).__name__}); remove it or give another --adapt-state") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise InvalidOptionError(f"{path} is not a specprobe omnidraft adapt state (version {STATE_VERSION})")
        if state["meta"] != meta:
            raise InvalidOptionError(f"{path} was saved for another drafter or setting ({state['meta']}), not {meta}; use another --adapt-state file")
        self.predictor.w = list(state["predictor"])
        self.bridge.cache = NGramCache.from_dict(state["ngram"])
        if self.distiller is not None and state["distiller"] is not None:
            self.distiller.load_state_dict(state["distiller"], path)


@dataclass
class OmniDraftConfig:
    draft_model: object = field(default=None, repr=False)  # a LoadedModel (model and tokenizer), any vocabulary
    num_tokens: int = 4  # draft tokens per step (at most)
    stop_below: float = 0.3  # stop drafting when the predicted chance that the chain is accepted falls below this
    ngram_cache: str | None = None  # a JSON file: the bridge's n-gram cache is loaded from it (if present) and saved to it
    draft_layers: int | None = None  # draft with only the drafter's first N layers (and its head): a faster drafter
    adapt_state: str | None = None  # a file: the adapter, optimizer, n-gram cache and acceptance model, loaded if present, saved after each request
    adapt_lr: float = 2e-3  # learning rate of the online distillation
    adapt_rank: int = 8  # LoRA rank of the online distillation

    def __post_init__(self):
        if not (hasattr(self.draft_model, "model") and hasattr(self.draft_model, "tokenizer")):
            raise InvalidOptionError("method 'omnidraft' needs draft_model=<a LoadedModel> (specprobe.load(name)): the drafter's tokenizer is needed")
        if self.draft_layers is not None:
            n_layers = self.draft_model.model.config.num_hidden_layers
            if not isinstance(self.draft_layers, int) or isinstance(self.draft_layers, bool) or not 1 <= self.draft_layers <= n_layers:
                raise InvalidOptionError(f"omnidraft option draft_layers must be an integer in [1, {n_layers}], got {self.draft_layers!r}")
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or self.num_tokens < 1:
            raise InvalidOptionError(f"omnidraft option num_tokens must be an integer >= 1, got {self.num_tokens!r}")
        if not isinstance(self.stop_below, (int, float)) or not 0.0 <= self.stop_below < 1.0:
            raise InvalidOptionError(f"omnidraft option stop_below must be in [0, 1), got {self.stop_below!r}")
        if self.adapt_state is not None and Path(self.adapt_state).is_dir():
            raise InvalidOptionError(f"omnidraft option adapt_state must be a file path, {self.adapt_state} is a directory")
        self.distill = DistillConfig(rank=self.adapt_rank, lr=self.adapt_lr)  # validates both


class OmniDraftDrafter(Drafter):
    """Adapts the drafter online (see the module docstring); OmniDraftFrozenDrafter does not."""

    name = "omnidraft"
    adapts = True

    def __init__(self, config: OmniDraftConfig | None = None, **options):
        self.config = config or OmniDraftConfig(**options)
        self.draft_tokenizer = self.config.draft_model.tokenizer
        self.target_tokenizer = None

    def _meta(self) -> dict:
        """What an adapt state must match: the drafter (by shape and a checksum of its embedding,
        not by path), the target's vocabulary and the LoRA rank."""
        cfg = self.draft_model.config
        with torch.no_grad():
            checksum = float(self.draft_model.get_input_embeddings().weight.double().abs().sum())
        return {"drafter": type(self.draft_model).__name__, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                "embedding_checksum": float(f"{checksum:.6g}"), "vocab": len(self.draft_tokenizer),
                "target_vocab": len(self.target_tokenizer), "rank": self.config.adapt_rank}

    def _state(self, session) -> _State:
        """This pair's state for this method and settings, made (and loaded from adapt_state) once
        per loaded drafter: kept in the drafter's backend's drafter state."""
        cfg = self.config
        store = session.target.for_model(self.config.draft_model.model).drafter_state()
        key = ("omnidraft", self.name, tokenizer_signature(self.target_tokenizer), cfg.draft_layers, cfg.adapt_state, cfg.adapt_rank, cfg.adapt_lr)
        if key not in store:
            load = cfg.adapt_state and Path(cfg.adapt_state).is_file()
            if (self.adapts or load) and not isinstance(self.draft_model, torch.nn.Module):
                raise InvalidOptionError("omnidraft adapts its drafter's weights (LoRA), which needs a torch drafter: load the draft model with "
                                         "backend='torch' (the target may stay on llama.cpp), or use omnidraft-frozen")
            distiller = OnlineDistiller(self.draft_model, cfg.distill) if (self.adapts or load) else None
            bridge = _bridge(store, self.draft_tokenizer, self.target_tokenizer)
            draft = session.target.for_model(distiller.draft_model) if distiller else self.draft_backend
            state = _State(bridge, AcceptancePredictor(), draft, distiller)
            if distiller is not None:
                state.shared_ids = bridge.shared_vocabulary()
            if load:
                state.load(cfg.adapt_state, self._meta())
            if cfg.ngram_cache and Path(cfg.ngram_cache).is_file():
                state.bridge.cache = NGramCache.load(cfg.ngram_cache)
            store[key] = state
        return store[key]

    def start(self, session) -> None:
        if session.tokenizer is None:
            raise InvalidOptionError("omnidraft needs the target's tokenizer: give generate a tokenizer (a prompt of token ids alone is not enough)")
        self.target_tokenizer = session.tokenizer
        self.draft_backend = session.target.for_model(self.config.draft_model.model, self.config.draft_layers)
        self.draft_model = self.draft_backend.model  # the module that drafts (the first draft_layers layers, if set)
        self.state = self._state(session)
        self.bridge, self.predictor, self.draft = self.state.bridge, self.state.predictor, self.state.draft
        self.last: tuple[list[float], list[int]] | None = None  # (draft probabilities, draft tokens per target token)
        self.cache = self.draft.new_cache()
        self.fed: list[int] = []  # draft tokens whose rows are in the draft cache, in order
        self.session = session
        self.prompt_len = len(session.ids)
        self.target_logprobs: list[torch.Tensor] = []  # per step, [emitted, n_shared]: the target's distributions (adapting only)

    def _text(self, target_ids: list[int]) -> str:
        return self.target_tokenizer.decode(target_ids, skip_special_tokens=True)

    @torch.inference_mode()
    def propose(self, session) -> Proposal:
        cfg = self.config
        context = self.draft_tokenizer(self._text(session.ids), add_special_tokens=False).input_ids
        if not context:
            return Proposal()
        common = min(_common_prefix(context, self.fed), len(context) - 1)  # feed at least one token
        room = self.draft.max_length - len(context) - 1
        if room < 1:
            return Proposal()
        self.draft.commit(self.cache, common, [])
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
        if self.adapts and step.emitted:
            # the row that predicted emitted[0] is the root, emitted[i] the accepted node i - 1
            rows = [0] + [1 + n for n in step.acceptance.path][: len(step.emitted) - 1]
            logits = step.output.logits[rows][:, self.state.shared_ids[1]]  # [emitted, n_shared]
            self.target_logprobs.append(torch.log_softmax(logits.float(), dim=-1))
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

    def distill(self) -> float | None:
        """One update of the adapter on this request's output (see distill.py); returns the loss,
        or None when the request taught nothing (no output, or text the two tokenizers cannot align)."""
        state, session = self.state, self.session
        if state.distiller is None or not self.target_logprobs:
            return None
        generated = session.ids[self.prompt_len :]
        texts = self.bridge.target_texts
        n_known = next((i for i, t in enumerate(generated) if not 0 <= t < len(texts) or texts[t] is None), len(generated))
        cut = max(0, n_known - state.distiller.config.max_tokens)
        target_ids = generated[cut:n_known]
        text = self._text(session.ids).encode("utf-8")
        gen_bytes = b"".join(texts[t] for t in target_ids)
        draft_ids = self.draft_tokenizer(self._text(session.ids), add_special_tokens=False).input_ids
        draft_lengths = [len(self.bridge.draft_texts[d] or b"") for d in draft_ids]
        if not target_ids or not text.endswith(gen_bytes) or sum(draft_lengths) != len(text) or None in (self.bridge.draft_texts[d] for d in draft_ids):
            return None  # the tokenizers' texts do not line up byte for byte
        alignment = align_for_distillation(
            draft_ids, draft_lengths, target_ids, [len(texts[t]) for t in target_ids], len(text) - len(gen_bytes), self.bridge.direct
        )
        items = [j for j, _ in alignment.kl] + alignment.nll
        if not items:
            return None
        past_len = min(_common_prefix(draft_ids, self.fed), self.draft.cache_length(self.cache), min(items) - 1)
        logprobs = torch.cat(self.target_logprobs)[cut:n_known]  # [len(target_ids), n_shared]
        return state.distiller.update(self.draft, draft_ids, past_len, self.cache, alignment, logprobs, state.shared_ids[0])

    def finish(self, session) -> None:
        """After a request: the online update (omnidraft), then save what the pair learned where
        `adapt_state` / `ngram_cache` say."""
        self.draft.release(self.cache)
        if self.adapts:
            self.distill()
            if self.config.adapt_state:
                self.state.save(self.config.adapt_state, self._meta())
        if self.config.ngram_cache:
            self.bridge.cache.save(self.config.ngram_cache)


class OmniDraftFrozenDrafter(OmniDraftDrafter):
    """OmniDraft without online distillation (the drafter as loaded, or as `adapt_state` left it)."""

    name = "omnidraft-frozen"
    adapts = False


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
