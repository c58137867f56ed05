"""One target forward over the pending tokens, the candidate tree and the auxiliary rows.

`Target` wraps a Hugging Face causal LM and runs its NORMAL forward (no forked modeling code):
the tree structure reaches the model only through a 4-D additive attention mask and explicit
position ids, both built by `tree.attention_masks`. For models whose layers differ in attention
type (Gemma 3 interleaves sliding-window and full layers) the mask is passed as the
{layer type: mask} mapping their forward accepts.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .attention import use_grouped_attention
from .draft_vocab import TokenFrequencies
from .errors import InvalidOptionError
from .kernels import LMHead, planned_decoder
from .kv_cache import cache_kwargs, cache_length
from .tree import AuxRows, DraftTree, Layout, additive_masks, attention_masks


KERNEL_MODES = ("planned", "linear")


@dataclass
class VerifyOutput:
    logits: torch.Tensor  # [1 + n_nodes, vocab]: row 0 is the root (last pending token), row 1 + i node i
    aux_logits: torch.Tensor | None  # [n_aux, vocab] or None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer, [1, q, hidden], when asked
    layout: Layout | None = None


class Target:
    """The target model as the engine sees it: embedding, context length, masks, one forward."""

    _cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model) -> "Target":
        """The Target of `model`, built once (kernel plans and the planned decoder are reused)."""
        if model not in cls._cache:
            cls._cache[model] = cls(model)
        return cls._cache[model]

    def __init__(self, model, kernels: str = "planned"):
        """kernels: "planned" (each matrix product runs the kernel measured fastest for its number
        of rows on this machine, see kernels.py; grouped-query attention without copying the
        cache, see attention.py) or "linear" (transformers' own F.linear and attention)."""
        if kernels not in KERNEL_MODES:
            raise InvalidOptionError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {kernels!r}")
        self.model = model
        self.embedding = model.get_input_embeddings()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = cfg
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_length = int(getattr(cfg, "max_position_embeddings", None) or 2048)
        self.device = model.device
        head, softcap = model.get_output_embeddings().weight, getattr(cfg, "final_logit_softcapping", None)
        if kernels == "planned":
            self.decoder = planned_decoder(model.get_decoder())  # the model without its LM head: a copy with its own config
            use_grouped_attention(self.decoder)  # tree rows attend without copying the cache (and, on CUDA, without
            # the stride-0 key/value views that repeat_kv makes for one key/value head: see attention.py)
            self.head = LMHead.tuned(head, softcap)
        else:
            self.decoder = model.get_decoder()
            self.head = LMHead(head, softcap)
        # the tokens seen (prompts, committed text): their most frequent form the draft-only rows' vocabulary
        self.token_frequencies = TokenFrequencies(self.vocab_size) if kernels == "planned" else None
        self._draft_vocabulary_due = False  # the counts moved: rebuild before the reduced head is next used
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

    def observe_tokens(self, token_ids: list[int]) -> None:
        """Count tokens the engine processed (a prompt, a step's committed tokens); when the counts
        have moved enough, the reduced draft vocabulary is rebuilt at its next use (never for
        methods that do not use it)."""
        if self.token_frequencies is not None and self.token_frequencies.observe(token_ids):
            self._draft_vocabulary_due = True

    def _draft_rows_on_reduced_head(self, n_full: int, n_draft: int) -> bool:
        """Whether this forward scores its draft-only rows on the reduced head: where the measured
        costs say it pays, with the vocabulary rebuilt first if the counts moved."""
        frequencies = self.token_frequencies
        if frequencies is None or not self.head.reduced_pays(n_full, n_draft, frequencies.size):
            return False
        if self._draft_vocabulary_due:
            self.head.set_reduced_vocabulary(frequencies.top())
            self._draft_vocabulary_due = False
        return self.head.reduced_weight is not None

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
        layout, embeds, mask, positions = self.inputs(cache_length(cache), pending, tree, aux)
        q = layout.n_rows
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            **cache_kwargs(self.decoder, cache),
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
