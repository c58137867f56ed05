"""Several generations' rows in one forward of a torch target (batched serving, engine/batch.py).

A decoding step reads every weight of the model for a handful of rows: on a CPU (and a GPU) it is
bound by the weights' bytes, not by the rows, so the rows of many generations verified in ONE
forward cost little more than one generation's. This module runs the model's normal forward
over the concatenation of every generation's new rows (each generation's pending token, tree and
auxiliary rows, one after another along the sequence axis) and keeps the generations apart where
they must be apart, in attention:

    rows       [1, R, hidden]        R = sum over generations of q_g (their new rows)
    linear     every layer's products run once over all R rows (the weights are read once)
    cache      `ManyCache.update` splits each layer's new keys/values by generation, writes each
               part into that generation's own PositionCache, and hands attention a `SplitRows`
    attention  `attend_split` (called by the grouped attention function, attention.py) runs each
               generation's queries against its own cache and its own mask, and concatenates

so a row sees exactly the keys, positions and mask it sees when its generation runs alone. What
may differ is the last bits of a matrix product, whose kernel and summation order depend on the
number of rows (the same caveat as a tree forward against a one-row step: README, "What lossless
means here"). A request with a prompt to feed (several pending tokens) or asking for hidden
states runs alone, as `TorchBackend.forward` runs it, so a prompt's cache never depends on what
else is served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from ...engine.protocol import ForwardRequest, VerifyOutput
from . import kv_cache
from .masks import attention_masks


@dataclass
class SplitRows:
    """One layer's keys and values, per generation, as attention must read them."""

    bounds: list[tuple[int, int]]  # per generation: its query rows [start, end) among the R rows
    keys: list[torch.Tensor]  # per generation: [1, kv_heads, past_g + q_g, head_dim] (its whole cache)
    values: list[torch.Tensor]
    masks: list[torch.Tensor | None]  # per generation: additive [1, 1, q_g, past_g + q_g], or None (one row, no window)


class ManyCache(Cache):
    """A transformers `Cache` over the PositionCaches of several generations, for one forward."""

    def __init__(self, caches: list, bounds: list[tuple[int, int]], masks: list[dict[str, torch.Tensor | None]], layer_types: list[str]):
        """masks: per generation {"full_attention": mask, "sliding_attention": mask}; layer_types:
        per layer its key in those dicts."""
        super().__init__(layers=[])
        self.caches = caches
        self.bounds = bounds
        self.masks = masks
        self.layer_types = layer_types

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """key_states, value_states [1, kv_heads, R, head_dim]: each generation's part goes into its cache."""
        keys, values = [], []
        for cache, (start, end) in zip(self.caches, self.bounds):
            k, v = cache.update(key_states[:, :, start:end], value_states[:, :, start:end], layer_idx)
            keys.append(k)
            values.append(v)
        kind = self.layer_types[layer_idx]
        split = SplitRows(self.bounds, keys, values, [m[kind] for m in self.masks])
        return split, split

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # read only where position ids are not given; every forward here gives them


def attend_split(attend, module, query: torch.Tensor, split: SplitRows, **kwargs):
    """query [1, heads, R, head_dim]: each generation's rows through `attend` (an attention function
    of transformers' signature) over its own keys, values and mask. Returns ([1, R, heads, head_dim], None)."""
    outs = [
        attend(module, query[:, :, start:end], keys, values, mask, **kwargs)[0]
        for (start, end), keys, values, mask in zip(split.bounds, split.keys, split.values, split.masks)
    ]
    return torch.cat(outs, dim=1), None


def layer_types(backend) -> list[str]:
    """Per decoder layer: which of a generation's masks it reads."""
    n = int(backend.config.num_hidden_layers)
    if backend.mask_mode == "per-layer-type":
        return list(backend.config.layer_types)[:n]
    return ["sliding_attention" if backend.mask_mode == "all-sliding" else "full_attention"] * n


def _masks(backend, layout, past: int) -> dict[str, torch.Tensor | None]:
    """A generation's masks by layer type. One row that no window cuts needs none (it sees its
    whole cache), as when it runs alone."""
    window = backend.sliding_window
    if layout.n_rows == 1 and (window is None or past + 1 <= window):
        return {"full_attention": None, "sliding_attention": None}
    full, sliding, _ = attention_masks(layout, past, backend.dtype, backend.device, window)
    return {"full_attention": full, "sliding_attention": sliding if sliding is not None else full}


def runs_together(request: ForwardRequest) -> bool:
    """Whether a request's rows may share the forward: one pending token (not a prompt), no hidden states."""
    return len(request.pending) == 1 and not request.output_hidden_states


@torch.inference_mode()
def forward_many(backend, requests: list[ForwardRequest]) -> list[VerifyOutput]:
    """What `backend.forward` gives each request alone, with the rows of those that `runs_together`
    in one forward of the model."""
    outputs: list[VerifyOutput | None] = [None] * len(requests)
    together = [i for i, r in enumerate(requests) if runs_together(r)]
    for i, r in enumerate(requests):
        if i not in together or len(together) == 1:
            outputs[i] = backend.forward(r.cache, r.pending, r.tree, r.aux, r.output_hidden_states)
    if len(together) < 2:
        return outputs
    layouts, embeds, positions, masks, bounds = [], [], [], [], []
    start = 0
    for i in together:
        r = requests[i]
        past = kv_cache.cache_length(r.cache)
        layout, e, _, pos = backend.inputs(past, r.pending, r.tree, r.aux)  # e [1, q, hidden], pos [1, q]
        layouts.append(layout)
        embeds.append(e)
        positions.append(pos)
        masks.append(_masks(backend, layout, past))
        bounds.append((start, start + layout.n_rows))
        start += layout.n_rows
    cache = ManyCache([requests[i].cache for i in together], bounds, masks, layer_types(backend))
    dummy = torch.zeros(1, 1, 1, 1, dtype=backend.dtype, device=backend.device)  # passes mask-making by; attend_split reads the real ones
    mask = {"full_attention": dummy, "sliding_attention": dummy} if backend.mask_mode == "per-layer-type" else dummy
    out = backend.decoder(
        inputs_embeds=torch.cat(embeds, dim=1),  # [1, R, hidden]
        attention_mask=mask,
        position_ids=torch.cat(positions, dim=1),  # [1, R]
        **{backend.cache_keyword: cache},
        use_cache=True,
    )
    hidden = out.last_hidden_state[0]  # [R, hidden]
    full_rows = [hidden[start : start + 1 + len(requests[i].tree)] for i, (start, _) in zip(together, bounds)]
    logits = backend.head(torch.cat(full_rows)).split([len(h) for h in full_rows])  # one head product over every verified row
    for k, i in enumerate(together):
        r, (start, end) = requests[i], bounds[k]
        n_real = 1 + len(r.tree)
        n_aux = end - start - n_real
        aux_logits = None
        if n_aux:
            aux_rows = hidden[start + n_real : end]
            reduced = backend._draft_rows_on_reduced_head(n_real, n_aux)
            aux_logits = backend.head.reduced(aux_rows) if reduced else backend.head(aux_rows)
        outputs[i] = VerifyOutput(logits[k], aux_logits, None, layouts[k])
    return outputs
