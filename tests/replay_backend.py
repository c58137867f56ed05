"""A backend for tests that replays target forwards it has already run (tests/test_sampling_e2e.py).

Thousands of sampled generations of a few tokens each visit only a few hundred distinct
(cached tokens, pending tokens, tree, auxiliary rows) inputs. `ReplayBackend` wraps a real
backend: the first forward on given inputs runs on the real model and its output is kept; the
same inputs later return that output. Everything else is the production path: the decoding loop,
the drafters (which propose from the logits they get back), the acceptance rules, the sampling
noise. The real model's KV cache for a token sequence is rebuilt from the longest saved prefix of
it when a forward has to run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specprobe.engine.tree import AuxRows, DraftTree


@dataclass
class ReplayCache:
    tokens: list[int] = field(default_factory=list)  # the tokens of the positions the cache holds
    real: object | None = None  # the real backend's cache for `tokens` (+ the last forward's rows), if current
    real_has_rows: bool = False  # the last forward ran on `real`
    row_tokens: list[int] = field(default_factory=list)  # token of each row of the last forward (pending, then nodes)


class ReplayBackend:
    def __init__(self, inner, max_saved_prefixes: int = 4000):
        self.inner = inner
        for name in ("name", "vocab_size", "max_length", "hidden_size", "dtype", "device", "supports_hidden_states", "verifies_trees"):
            setattr(self, name, getattr(inner, name))
        self.outputs: dict[tuple, object] = {}
        self.prefixes: dict[tuple[int, ...], object] = {}  # token sequence -> a real cache holding exactly it
        self.max_saved_prefixes = max_saved_prefixes
        self.hits = self.misses = 0

    # -- the protocol ------------------------------------------------------------------------
    def new_cache(self) -> ReplayCache:
        return ReplayCache()

    def cache_length(self, cache: ReplayCache) -> int:
        return len(cache.tokens)

    def forward(self, cache: ReplayCache, pending: list[int], tree: DraftTree, aux: AuxRows | None = None, output_hidden_states: bool = False):
        key = (tuple(cache.tokens), tuple(pending), tuple(tree.tokens), tuple(tree.parents), _aux_key(aux), output_hidden_states)
        cache.row_tokens = list(pending) + list(tree.tokens)
        if key in self.outputs:
            self.hits += 1
            cache.real_has_rows = False
            return self.outputs[key]
        self.misses += 1
        if cache.real is None:
            cache.real = self._real_cache(cache.tokens)
        out = self.inner.forward(cache.real, pending, tree, aux, output_hidden_states)
        cache.real_has_rows = True
        self.outputs[key] = out
        return out

    def commit(self, cache: ReplayCache, past: int, rows: list[int]) -> None:
        cache.tokens = cache.tokens[:past] + [cache.row_tokens[r] for r in rows]
        if cache.real_has_rows:
            self.inner.commit(cache.real, past, rows)
            if len(self.prefixes) < self.max_saved_prefixes and tuple(cache.tokens) not in self.prefixes:
                self.prefixes[tuple(cache.tokens)] = self.inner.prefix_copy(cache.real, len(cache.tokens))
        else:
            cache.real = None  # the rows this commit keeps were never computed on it
        cache.real_has_rows = False

    def release(self, cache: ReplayCache) -> None:
        cache.real = None

    def _real_cache(self, tokens: list[int]):
        """A real cache holding exactly `tokens`: a copy of the longest saved prefix, the rest prefilled."""
        n = next((n for n in range(len(tokens), 0, -1) if tuple(tokens[:n]) in self.prefixes), 0)
        real = self.inner.prefix_copy(self.prefixes[tuple(tokens[:n])], n) if n else self.inner.new_cache()
        if n < len(tokens):
            self.inner.forward(real, tokens[n:], DraftTree())
            self.inner.commit(real, n, list(range(len(tokens) - n)))
        return real

    # -- the rest passes through -------------------------------------------------------------
    def __getattr__(self, name):  # embed, embedding_stats, cost_curve, observe_tokens, drafter_state, ...
        return getattr(self.inner, name)


def _aux_key(aux: AuxRows | None):
    if aux is None or len(aux) == 0:
        return None
    embeds = aux.embeds.detach().to("cpu", torch.float32).contiguous()
    return (embeds.numpy().tobytes(), tuple(aux.anchor), tuple(aux.offset), tuple(aux.sees))
