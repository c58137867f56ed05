"""One target forward over the pending tokens, the candidate tree and the auxiliary rows.

`Target` wraps a Hugging Face causal LM and runs its NORMAL forward (no forked modeling code):
the tree structure reaches the model only through a 4-D additive attention mask and explicit
position ids, both built by `tree.attention_masks`. For models whose layers differ in attention
type (Gemma 3 interleaves sliding-window and full layers) the mask is passed as the
{layer type: mask} mapping their forward accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import cache_length
from .tree import AuxRows, DraftTree, Layout, attention_masks


@dataclass
class VerifyOutput:
    logits: torch.Tensor  # [1 + n_nodes, vocab]: row 0 is the root (last pending token), row 1 + i node i
    aux_logits: torch.Tensor | None  # [n_aux, vocab] or None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer, [1, q, hidden], when asked
    layout: Layout | None = None


class Target:
    """The target model as the engine sees it: embedding, context length, masks, one forward."""

    def __init__(self, model):
        self.model = model
        self.embedding = model.get_input_embeddings()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = cfg
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_length = int(getattr(cfg, "max_position_embeddings", None) or 2048)
        self.device = model.device
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

    @torch.inference_mode()
    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Input embeddings as the model computes them ([len, hidden]; Gemma's sqrt(d) scale included)."""
        return self.embedding(torch.tensor([token_ids], device=self.device))[0]

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
        layout = Layout.of(len(pending), tree, aux)
        past = cache_length(cache)
        embeds = self.embedding(torch.tensor([pending + tree.tokens], device=self.device))  # [1, L+n, h]
        if aux is not None and len(aux):
            embeds = torch.cat([embeds, aux.embeds.to(embeds.dtype)[None]], dim=1)
        q = layout.n_rows
        if layout.is_chain:
            # Plain causal rows: the model's own mask is exactly right (and is what `generate` uses).
            mask = None
            positions = torch.arange(past, past + q, device=self.device)[None]
        else:
            full, sliding, positions = attention_masks(layout, past, embeds.dtype, self.device, self.sliding_window)
            if self.mask_mode == "per-layer-type":
                mask = {"full_attention": full, "sliding_attention": sliding}
            elif self.mask_mode == "all-sliding":
                mask = sliding
            else:
                mask = full
        n_logit_rows = q - (layout.n_pending - 1)  # the root, the tree nodes, the auxiliary rows
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=n_logit_rows,
            output_hidden_states=output_hidden_states,
        )
        logits = out.logits[0].float()  # [1 + n + m, vocab]
        n_real = 1 + len(tree)
        aux_logits = logits[n_real:] if aux is not None and len(aux) else None
        return VerifyOutput(logits[:n_real], aux_logits, out.hidden_states if output_hidden_states else None, layout)
