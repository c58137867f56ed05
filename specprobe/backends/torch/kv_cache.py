"""Every operation on the target's KV cache lives here.

transformers changes its cache classes between versions; the rest of specprobe only calls
`new_cache`, `cache_length`, `keep_rows`, `prefix_copy`, `snapshot`, `cache_keyword` and
`cache_kwargs`. The cache is a `PositionCache`: a transformers `Cache` whose layers
(`PositionLayer`) keep their keys and values in buffers allocated once per generation, indexed by
position: position p of the sequence is row p of every layer's keys/values. Every layer keeps
every position (sliding-window layers too; their window is applied through the attention mask
instead, see `tree.attention_masks`), as a `DynamicCache` made without the model config does.

One forward of q new rows writes them at rows [length, length + q) of each layer's buffer
(`PositionLayer.update`, which transformers' attention calls) and attends to the view
[:length + q]; `keep_rows` moves the accepted rows into place with one gather per layer and
shortens the length. Nothing is reallocated per step (a growing `DynamicCache` copies the whole
cache with `torch.cat` in every layer of every forward).

Sizing: the first forward allocates its rows plus HEADROOM positions (rounded up to BLOCK), and a
generation that outgrows the buffer doubles it (one copy of what it holds). `Backend.new_cache()`
takes no length (the same cache serves prompts of unknown length, draft models, the cost curve and
training), so the size is not read from max_new_tokens; `new_cache(capacity=...)` takes one where a
caller knows it. A typical generation allocates once; one of N positions at most log2(N / HEADROOM)
times.

CUDA graphs (not built here): between two growths the buffers are fixed in size and address, so a
graph captured over a forward of q rows could replay over them if the write position and the
read length were device tensors (an `index_copy_` at a position tensor, attention over the whole
buffer with the mask hiding rows past length + q); one graph per (tree size, capacity).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

HEADROOM = 512  # positions allocated past the first forward's rows: a typical answer and its verification trees
BLOCK = 256  # capacities are multiples of this


@dataclass
class KeptRows:
    """Which rows a commit keeps, as the gather reads them: `source` [n] (long) are the buffer rows
    moved to [prefix, prefix + n); None when they are already there."""

    prefix: int
    n: int
    source: torch.Tensor | None

    @classmethod
    def of(cls, prefix: int, rows: list[int]) -> "KeptRows":
        """The gather of a commit that keeps positions [0, prefix) and the new rows `rows` (counted
        from prefix, increasing).

        >>> kept = KeptRows.of(10, [0, 2, 5])
        >>> kept.source.tolist(), kept.n
        ([10, 12, 15], 3)
        >>> KeptRows.of(10, [0, 1]).source is None  # already contiguous: only the length changes
        True
        """
        contiguous = rows == list(range(len(rows)))
        return cls(prefix, len(rows), None if contiguous else torch.tensor(rows, dtype=torch.long) + prefix)


def capacity_for(needed: int, current: int = 0) -> int:
    """Rows to allocate for `needed` positions: the first time `needed` + HEADROOM rounded up to
    BLOCK, after that (a buffer of `current` rows outgrown) at least double.

    >>> capacity_for(300), capacity_for(1500)
    (1024, 2048)
    >>> capacity_for(1025, current=1024)
    2048
    """
    want = needed + HEADROOM if current == 0 else max(needed, 2 * current)
    return -(-want // BLOCK) * BLOCK


class PositionLayer(DynamicLayer):
    """One layer's keys and values in a preallocated, position-indexed buffer.

    `keys` and `values` (what transformers reads) are views of the buffer's first `length` rows.
    Keys and values of the same shape share one buffer [2, batch, kv_heads, capacity, head_dim],
    so a commit gathers both with one `index_select` and one copy.
    """

    def __init__(self, capacity: int | None = None):
        super().__init__()
        self.capacity_hint = capacity
        self.length = 0
        self.capacity = 0
        self.buffers: list[torch.Tensor] = []  # [2, b, h, capacity, d], or one [1, b, h, capacity, d] each for keys and values

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _allocate(self, like_keys: torch.Tensor, like_values: torch.Tensor, capacity: int) -> None:
        """New buffers of `capacity` rows holding the current `length` rows (the first: empty)."""
        shapes = [like_keys.shape] if like_keys.shape == like_values.shape else [like_keys.shape, like_values.shape]
        old = self.buffers
        self.buffers = [torch.empty((3 - len(shapes), *s[:2], capacity, s[3]), dtype=like_keys.dtype, device=like_keys.device) for s in shapes]
        for new, prev in zip(self.buffers, old):
            new[:, :, :, : self.length].copy_(prev[:, :, :, : self.length])
        self.capacity = capacity

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values [batch, kv_heads, capacity, head_dim]: views made afresh each time, in the
        current grad mode (a view made under no_grad may not be written with grad enabled: ConFu's
        training fills the cache without gradients, then runs rows with them)."""
        return self.buffers[0][0], self.buffers[-1][-1]

    def _views(self) -> None:
        keys, values = self._rows()
        self.keys = keys[:, :, : self.length]  # [batch, kv_heads, length, head_dim]
        self.values = values[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the q new rows at [length, length + q); returns the views of rows [0, length + q)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            hint = self.capacity_hint if not self.capacity and self.capacity_hint and self.capacity_hint >= end else None
            self._allocate(key_states, value_states, hint or capacity_for(end, self.capacity))
        keys, values = self._rows()
        keys[:, :, self.length : end].copy_(key_states)
        values[:, :, self.length : end].copy_(value_states)
        self.length = end
        self._views()
        return self.keys, self.values

    def keep(self, kept: KeptRows) -> None:
        """Keep rows [0, prefix) and the rows kept.source, moved to [prefix, prefix + n)."""
        if not self.buffers:
            return
        if kept.source is not None:
            for buffer in self.buffers:  # one gather of keys and values together
                source = kept.source.to(buffer.device)
                buffer[:, :, :, kept.prefix : kept.prefix + kept.n] = buffer.index_select(3, source)
        self.length = kept.prefix + kept.n
        self._views()

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` positions (transformers' convention), nothing moved."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count (tokens to remove)")
        if self.buffers and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    def reset(self) -> None:
        self.length = 0
        if self.buffers:
            self._views()


class PositionCache(Cache):
    """A transformers `Cache` of `PositionLayer`s, one made per layer on its first update."""

    def __init__(self, capacity: int | None = None):
        super().__init__(layers=[])
        self.capacity = capacity

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(PositionLayer(self.capacity))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)


def new_cache(capacity: int | None = None) -> PositionCache:
    """An empty cache; `capacity`: positions to allocate at once where the caller knows them
    (prompt + max_new_tokens + the largest tree), else HEADROOM past the first forward's rows."""
    return PositionCache(capacity)


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
    which become positions 10, 11 and 12 (`KeptRows`).
    """
    kept = KeptRows.of(prefix_len, rows)
    for layer in cache.layers:
        if isinstance(layer, PositionLayer):
            layer.keep(kept)
            continue
        for attr in ("keys", "values"):  # a transformers layer (a DynamicCache handed in): compact its tensors
            t = getattr(layer, attr)  # [batch, heads, seq, head_dim]
            if t is None or t.numel() == 0:
                continue
            if kept.source is not None:
                t[:, :, prefix_len : prefix_len + kept.n] = t.index_select(2, kept.source.to(t.device))
            setattr(layer, attr, t[:, :, : prefix_len + kept.n])


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
