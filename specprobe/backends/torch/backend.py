"""The torch backend: a Hugging Face causal LM run in PyTorch, as the engine's `Backend`.

It runs the model's NORMAL forward (no forked modeling code): the tree reaches the model only
through a 4-D additive attention mask and explicit position ids (masks.py). For models whose
layers differ in attention type (Gemma 3 interleaves sliding-window and full layers) the mask is
passed as the {layer type: mask} mapping their forward accepts. With `kernels="planned"` (the
default) the forward runs on a copy of the decoder whose matrix products use the kernels measured
fastest on this machine for their number of rows (kernels.py), grouped-query attention without
copying the cache (attention.py), and the reduced head for draft-only rows (draft_vocab.py).

State that outlives one generation (the decoder copy, kernel plans and weight copies, the cost
curve, the reduced-head token counts, drafters' caches) belongs to the `TorchBackend` of a model,
which `TorchBackend.of(model)` builds once and keeps ON the model (an attribute), holding the model
itself only through a weak reference: dropping the model frees all of it, and no module-level
table of models exists.
"""

from __future__ import annotations

import weakref

import torch

from ...engine.protocol import ForwardRequest, VerifyOutput
from ...engine.tree import AuxRows, DraftTree, Layout
from ...errors import InvalidOptionError
from . import kv_cache
from .attention import use_grouped_attention
from .draft_vocab import TokenFrequencies
from .kernels import LMHead, planned_decoder
from .many import forward_many
from .masks import additive_masks, attention_masks

KERNEL_MODES = ("planned", "linear")
ATTRIBUTE = "_specprobe_backend"  # where a model keeps its TorchBackend


class _Slot:
    """Holds a model's backend on the model; a copy of the model (deepcopy, pickle) gets an empty
    slot, so a copy never shares, nor drags along, the original's backend."""

    def __init__(self, backend: "TorchBackend | None" = None):
        self.backend = backend

    def __deepcopy__(self, memo) -> "_Slot":
        return _Slot()

    def __reduce__(self):
        return (_Slot, ())


class LearningScope:
    """What the backend learns across requests within one scope: the token counts that choose the
    reduced draft vocabulary. The bench gives each method a scope of its own, so no method drafts
    with a vocabulary learned from another method's answer to the same question."""

    def __init__(self, vocab_size: int):
        self.frequencies = TokenFrequencies(vocab_size)
        self.due = False  # the counts moved: rebuild the reduced head before its next use


class TorchBackend:
    """The target as the engine sees it: embedding, context length, masks, one forward."""

    name = "torch"
    supports_hidden_states = True
    verifies_trees = True

    @classmethod
    def of(cls, model) -> "TorchBackend":
        """The TorchBackend of `model`, built once and kept on the model (kernel plans, the planned
        decoder and the cost curve are reused by every generation)."""
        slot = model.__dict__.get(ATTRIBUTE)
        if slot is None or slot.backend is None or slot.backend._model() is not model:
            slot = model.__dict__[ATTRIBUTE] = _Slot(cls(model))
        return slot.backend

    def __init__(self, model, kernels: str = "planned"):
        """kernels: "planned" (each matrix product runs the kernel measured fastest for its number
        of rows on this machine, see kernels.py; grouped-query attention without copying the
        cache, see attention.py) or "linear" (transformers' own F.linear and attention)."""
        if kernels not in KERNEL_MODES:
            raise InvalidOptionError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {kernels!r}")
        self._model = weakref.ref(model)  # never a strong reference: the model owns this backend
        self.kernels = kernels
        self.embedding = model.get_input_embeddings()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = cfg
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.hidden_size = int(cfg.hidden_size)
        self.max_length = int(getattr(cfg, "max_position_embeddings", None) or 2048)
        self.device = model.device
        head, softcap = model.get_output_embeddings().weight, getattr(cfg, "final_logit_softcapping", None)
        if kernels == "planned":
            self.decoder = planned_decoder(model.get_decoder())  # the model without its LM head: a copy with its own config
            self.shares_forwards = use_grouped_attention(self.decoder)  # tree rows attend without copying the cache (and, on CUDA, without
            # the stride-0 key/value views that repeat_kv makes for one key/value head: see attention.py)
            self.head = LMHead.tuned(head, softcap)
        else:
            self.decoder = model.get_decoder()
            self.shares_forwards = False
            self.head = LMHead(head, softcap)
        self.cache_keyword = kv_cache.cache_keyword(self.decoder)
        self.dtype = self.embedding.weight.dtype
        layer_types = getattr(cfg, "layer_types", None) or []
        window = getattr(cfg, "sliding_window", None)
        if window and "sliding_attention" in layer_types:
            self.mask_mode = "per-layer-type"  # Gemma 2/3, Qwen 2/3 with sliding layers, ...
        elif window and not layer_types and getattr(cfg, "use_sliding_window", True):
            self.mask_mode = "all-sliding"  # Mistral-style: every layer slides
        else:
            self.mask_mode = "full"
        self.sliding_window = int(window) if self.mask_mode != "full" else None
        self._scopes: dict[str, LearningScope] = {}
        self._scope = self.learning_scope("default") if kernels == "planned" else None
        self._cost_curve: dict[int, float] | None = None
        self._embedding_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._drafter_state: dict = {}
        self._truncated: dict[int, object] = {}

    @property
    def model(self):
        """The model this backend runs (it must still be alive)."""
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this TorchBackend was freed")
        return model

    # -- the KV cache -------------------------------------------------------------------------
    def new_cache(self):
        return kv_cache.new_cache()

    def cache_length(self, cache) -> int:
        return kv_cache.cache_length(cache)

    def commit(self, cache, past: int, rows: list[int]) -> None:
        kv_cache.keep_rows(cache, past, rows)

    def release(self, cache) -> None:
        """Nothing to free: the cache's tensors go with the cache object."""

    def cache_argument(self, module, cache) -> dict:
        """The keyword argument that hands `cache` to `module`'s forward (training-time use)."""
        return kv_cache.cache_kwargs(module, cache)

    def prefix_copy(self, cache, n: int):
        """A new cache holding copies of the first n positions, usable with gradients."""
        return kv_cache.prefix_copy(cache, n)

    # -- what outlives a generation -----------------------------------------------------------
    def cost_curve(self) -> dict[int, float]:
        """T(q) on this machine: read from disk, or measured once and saved (profile.py)."""
        if self._cost_curve is None:
            from .profile import cost_curve

            self._cost_curve = cost_curve(self)
        return self._cost_curve

    def set_cost_curve(self, times: dict[int, float]) -> None:
        self._cost_curve = dict(times)

    def embedding_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and standard deviation of the embeddings of the whole vocabulary."""
        if self._embedding_stats is None:
            total = torch.zeros(self.hidden_size, dtype=torch.float64)
            squares = torch.zeros_like(total)
            for start in range(0, self.vocab_size, 16384):
                e = self.embed(list(range(start, min(start + 16384, self.vocab_size)))).double().cpu()
                total += e.sum(0)
                squares += (e * e).sum(0)
            mean = total / self.vocab_size
            std = (squares / self.vocab_size - mean * mean).clamp_min(0).sqrt()
            self._embedding_stats = (mean.float(), std.float())
        return self._embedding_stats

    def drafter_state(self) -> dict:
        return self._drafter_state

    def learning_scope(self, name: str) -> LearningScope | None:
        """Switch what the backend learns across requests to the scope `name` (made when new)."""
        if self.kernels != "planned":
            return None
        if name not in self._scopes:
            self._scopes[name] = LearningScope(self.vocab_size)
        if getattr(self, "_scope", None) is not self._scopes[name]:
            self._scope = self._scopes[name]
            self._scope.due = True  # the head holds another scope's reduced vocabulary
        return self._scope

    def observe_tokens(self, token_ids: list[int]) -> None:
        """Count tokens the engine processed (a prompt, a step's committed tokens); when the counts
        have moved enough, the reduced draft vocabulary is rebuilt at its next use (never for
        methods that do not use it)."""
        if self._scope is not None and self._scope.frequencies.observe(token_ids):
            self._scope.due = True

    def _draft_rows_on_reduced_head(self, n_full: int, n_draft: int) -> bool:
        """Whether this forward scores its draft-only rows on the reduced head: where the measured
        costs say it pays, with the vocabulary rebuilt first if the counts moved."""
        scope = self._scope
        if scope is None or not self.head.reduced_pays(n_full, n_draft, scope.frequencies.size):
            return False
        if scope.due:
            self.head.set_reduced_vocabulary(scope.frequencies.top() if scope.frequencies.distinct else None)
            scope.due = False
        return self.head.reduced_weight is not None

    def for_model(self, model, layers: int | None = None) -> "TorchBackend":
        """The TorchBackend of another torch model (a draft model), or of its first `layers`
        decoder layers and its head (truncate.py), built once and kept by that model."""
        if layers is None or layers >= model.config.num_hidden_layers:
            return TorchBackend.of(model)
        owner = TorchBackend.of(model)
        if layers not in owner._truncated:
            from .truncate import truncated_model

            owner._truncated[layers] = truncated_model(model, layers)
        return TorchBackend.of(owner._truncated[layers])

    # -- what trained heads need (eagle, confu) ------------------------------------------------
    def tuned_module(self, module):
        """A copy of `module` (weights shared) whose linear layers run this machine's kernel plans."""
        return planned_decoder(module) if self.kernels == "planned" else module

    def tuned_head(self, weight: torch.Tensor, softcap: float | None = None) -> LMHead:
        """An LM head over `weight` [vocab, hidden] with this machine's kernel plan."""
        return LMHead.tuned(weight, softcap) if self.kernels == "planned" else LMHead(weight, softcap)

    # -- one forward --------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Input embeddings as the model computes them ([len, hidden]; Gemma's sqrt(d) scale included)."""
        return self.embedding(torch.tensor([token_ids], device=self.device))[0]

    @torch.inference_mode()
    def inputs(self, past: int, pending: list[int], tree: DraftTree, aux: AuxRows | None = None):
        """(layout, input embeddings [1, q, hidden], attention mask, position ids [1, q]) of one forward."""
        layout = Layout.of(len(pending), tree, aux)
        embeds = self.embedding(torch.tensor([pending + tree.tokens], device=self.device))  # [1, L+n, h]
        if aux is not None and len(aux):
            embeds = torch.cat([embeds, aux.embeds.to(embeds.device, embeds.dtype)[None]], dim=1)
        if layout.is_chain:
            # Plain causal rows: the model's own mask is exactly right (and is what `generate` uses).
            return layout, embeds, None, torch.arange(past, past + layout.n_rows, device=self.device)[None]
        full, sliding, positions = attention_masks(layout, past, embeds.dtype, self.device, self.sliding_window)
        return layout, embeds, self._mask_argument(full, sliding), positions

    def _mask_argument(self, full: torch.Tensor, sliding: torch.Tensor | None):
        """The `attention_mask` argument this model's forward takes for these additive masks."""
        if self.mask_mode == "per-layer-type":
            return {"full_attention": full, "sliding_attention": sliding}
        return sliding if self.mask_mode == "all-sliding" else full

    def attention_argument(self, allowed: torch.Tensor, positions: torch.Tensor, past: int):
        """The mask argument for new rows at `positions` ([q]) after `past` cached positions, where
        allowed [q, past + q] says which cached and new rows each new row sees (training-time use)."""
        keys = torch.cat([torch.arange(past), positions])
        full, sliding = additive_masks(allowed, positions, keys, self.dtype, self.device, self.sliding_window)
        return self._mask_argument(full, sliding)

    @torch.inference_mode()
    def forward(
        self,
        cache,
        pending: list[int],
        tree: DraftTree,
        aux: AuxRows | None = None,
        output_hidden_states: bool = False,
    ) -> VerifyOutput:
        """Run the target once over [pending][tree][aux]; the cache grows by all those rows."""
        layout, embeds, mask, positions = self.inputs(kv_cache.cache_length(cache), pending, tree, aux)
        q = layout.n_rows
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            **{self.cache_keyword: cache},
            use_cache=True,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state[0]  # [q, hidden]; the pending rows before the root need no logits
        n_real = 1 + len(tree)
        root = layout.n_pending - 1
        n_aux = q - root - n_real
        if self._draft_rows_on_reduced_head(n_real, n_aux):
            logits = self.head(hidden[root : root + n_real])  # [1 + n, vocab]: the exact full head
            aux_logits = self.head.reduced(hidden[root + n_real :])  # [m, vocab]: draft-only rows
        else:  # one product over every row that needs logits
            logits = self.head(hidden[root:])
            logits, aux_logits = logits[:n_real], (logits[n_real:] if n_aux else None)
        return VerifyOutput(logits, aux_logits, out.hidden_states if output_hidden_states else None, layout)

    def forward_many(self, requests: list[ForwardRequest]) -> list[VerifyOutput]:
        """What `forward` gives each request alone; the rows of several generations' steps share one
        forward of the model (many.py) where the decoder runs the grouped attention that splits them."""
        if not self.shares_forwards:
            return [self.forward(r.cache, r.pending, r.tree, r.aux, r.output_hidden_states) for r in requests]
        return forward_many(self, requests)
