"""Attention over the KV cache for many new rows without copying the cache.

With grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads; Gemma3: 4 share 1)
transformers' SDPA path repeats every cached key and value once per query head sharing it
(`repeat_kv`) whenever more than one row is new and a mask is given: a verification forward over
a 1500-token cache then copies the whole cache three or four times in every layer. For one new
row transformers already avoids the copy by folding the query heads of a group into rows; this
module does the same for q rows (only the query and the mask are reshaped, never the cache):

    query  [batch, heads, q, dim]      -> [batch, kv_heads, group * q, dim]   (q rows: small)
    mask   [batch, 1, q, keys]         -> [batch, 1, group * q, keys]          (tiled; small)

so row r * q + i of key/value head g is query head g * group + r at position i, which sees the
same keys through the same mask row i. Each output is the same softmax-weighted sum over the same
dot products as before (the SDPA kernel is the same).

It also keeps a CUDA defect away from verification: for one key/value head (Gemma3-270M),
`repeat_kv` returns a stride-0 view of the cache, and PyTorch's memory-efficient SDPA kernel
returns wrong rows for such broadcast keys/values with a mask (pytorch/pytorch#191937). Here keys
and values reach SDPA as the cache holds them, on every device. The figures (speed, the defect
on an H100): docs/engine-measurements.md.

`use_grouped_attention(decoder)` switches a decoder COPY to it (the engine's planned decoder owns
its own config); any case it does not cover (no grouping, a per-head mask, attention biases,
softcapping, prefill without a mask) goes to transformers' own SDPA function unchanged. It is also
where the rows of several generations in one forward (many.py) are split, each to its own cache.
"""

from __future__ import annotations

import torch.nn.functional as F

from .many import SplitRows, attend_split

NAME = "specprobe_grouped_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature; query [b, heads, q, d], key/value [b, kv_heads, keys, d],
    attention_mask [b, 1, q, keys] (additive or boolean) or None. Returns ([b, q, heads, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(key, SplitRows):  # several generations' rows in one forward (many.py): each over its own cache
        return attend_split(grouped_sdpa, module, query, key, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    group = getattr(module, "num_key_value_groups", 1)
    batch, heads, q, dim = query.shape
    plain = (
        group == 1
        or dropout
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("s_aux") is not None
        or (attention_mask is None and q > 1)  # prefill: is_causal path, once per prompt
        or (attention_mask is not None and attention_mask.shape[1] != 1)
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    folded = query.reshape(batch, heads // group, group * q, dim)
    mask = None if attention_mask is None else attention_mask.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register() -> None:
    """Register grouped_sdpa with transformers (its registries are global; registering twice is harmless)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the model builds its own masks as for "sdpa"


def use_grouped_attention(decoder) -> bool:
    """Switch `decoder` (a copy the engine owns, not the user's model) from "sdpa" to grouped_sdpa.
    Returns whether it did; models on other attention implementations are left alone."""
    config = decoder.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    config._attn_implementation = NAME
    return True
