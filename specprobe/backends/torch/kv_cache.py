"""Every operation on the target's KV cache lives here.

transformers changes its cache classes between versions; the rest of specprobe only calls
`new_cache`, `cache_length`, `keep_rows`, `prefix_copy`, `cache_keyword` and `cache_kwargs`. The cache is a `DynamicCache` made WITHOUT the
model config, so every layer keeps every position (sliding-window layers too; their window is
applied through the attention mask instead, see `tree.attention_masks`). That makes the cache a
plain position-indexed store: position p of the sequence is row p of every layer's keys/values.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


def cache_keyword(model) -> str:
    """The name of the keyword argument that hands a cache to `model`'s forward: `cache` where the
    forward takes it (transformers 5.2x renamed it; `past_key_values` warns there and goes in
    5.40), else `past_key_values` (earlier versions). The backend reads it once per model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper passes **kwargs on
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """{cache_keyword(model): cache}."""
    return {cache_keyword(model): cache}


def _layers(cache) -> list[tuple[object, str, str]]:
    """(holder, key attribute, value attribute) per layer, for the cache layouts transformers has used."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer, "keys", "values") for layer in cache.layers]
    raise TypeError(f"unsupported cache type {type(cache).__name__}")  # pragma: no cover


def cache_length(cache) -> int:
    """Number of positions held in the cache."""
    return cache.get_seq_length()


@torch.inference_mode()  # the cache's tensors are inference tensors
def keep_rows(cache, prefix_len: int, rows: list[int]) -> None:
    """Keep positions [0, prefix_len) plus the new rows `rows` (indices counted from prefix_len,
    increasing), moved to be contiguous after the prefix; drop everything else.

    Used after a verification forward: the forward appended all its rows (pending tokens, tree
    nodes, auxiliary rows) after `prefix_len`; only the accepted path stays.
    Example: prefix_len=10, rows=[0, 2, 5] keeps positions 0..9 and the rows at 10, 12 and 15,
    which become positions 10, 11 and 12.
    """
    n_keep = len(rows)
    contiguous = rows == list(range(n_keep))
    if not contiguous:
        src = torch.tensor(rows, dtype=torch.long) + prefix_len
    for holder, k_attr, v_attr in _layers(cache):
        for attr in (k_attr, v_attr):
            t = getattr(holder, attr)  # [batch, heads, seq, head_dim]
            if t is None or t.numel() == 0:
                continue
            if not contiguous:
                t[:, :, prefix_len : prefix_len + n_keep] = t.index_select(2, src.to(t.device))
            setattr(holder, attr, t[:, :, : prefix_len + n_keep])


def prefix_copy(cache, n: int) -> DynamicCache:
    """A new cache holding copies of the first `n` positions, as ordinary tensors (not inference
    tensors), so a forward with gradients can attend to them (online distillation)."""
    out = DynamicCache()
    with torch.inference_mode(False):
        for i, (h, k, v) in enumerate(_layers(cache)):
            out.update(getattr(h, k)[:, :, :n].clone(), getattr(h, v)[:, :, :n].clone(), i)
    return out


def snapshot(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's (keys, values), for tests and debugging."""
    return [(getattr(h, k).clone(), getattr(h, v).clone()) for h, k, v in _layers(cache)]
