"""A backend for tests that replays the target's rows it has already computed (tests/test_sampling_e2e.py).

Thousands of sampled generations of a few tokens each visit only a few thousand distinct rows:
a row's logits depend on the tokens it sees (the cached text, and its own path through the
tree), not on the other rows of its forward. `ReplayBackend` wraps a real backend and keeps every
row's logits under that context; a forward whose rows were all computed before is answered from
the table, any other runs on the real model (and fills the table). Everything else is the
production path: the decoding loop, the drafters (which propose from the logits they get back),
the acceptance rules, the sampling noise. The real model's KV cache for a token sequence is
rebuilt from the longest saved prefix of it when a forward has to run.

Batching the seeds: with `defer=True` a forward that needs rows not in the table records itself
and raises `ReplayMiss` (the caller abandons that generation and runs it again later);
`run_deferred()` then computes the recorded forwards' rows together, merged into tree forwards
of up to 64 rows from the prompt (`warm` names the prompt), so that a thousand rare continuations
cost a few dozen forwards rather than a thousand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specprobe.engine.protocol import VerifyOutput
from specprobe.engine.tree import ROOT, AuxRows, DraftTree, Layout


@dataclass
class ReplayCache:
    tokens: list[int] = field(default_factory=list)  # the tokens of the positions the cache holds
    real: object | None = None  # the real backend's cache for `tokens` (+ the last forward's rows), if current
    real_has_rows: bool = False  # the last forward ran on `real`
    row_tokens: list[int] = field(default_factory=list)  # token of each row of the last forward (pending, then nodes)


class ReplayMiss(Exception):
    """A deferred forward: its rows are computed by `run_deferred`."""


@dataclass
class _Deferred:
    context: tuple[int, ...]  # the tokens up to and including the forward's root
    tree: DraftTree
    aux: AuxRows | None


class ReplayBackend:
    def __init__(self, inner, max_saved_prefixes: int = 4000, defer: bool = False):
        self.inner = inner
        for name in ("name", "vocab_size", "max_length", "hidden_size", "dtype", "device", "supports_hidden_states", "verifies_trees"):
            setattr(self, name, getattr(inner, name))
        self.rows: dict[tuple, torch.Tensor] = {}  # row context -> logits [vocab]
        self.prefixes: dict[tuple[int, ...], object] = {}  # token sequence -> a real cache holding exactly it
        self.max_saved_prefixes = max_saved_prefixes
        self.hits = self.misses = 0
        self.defer, self.deferred, self.deferred_signatures, self.prompt = defer, [], set(), None

    # -- the protocol ------------------------------------------------------------------------
    def new_cache(self) -> ReplayCache:
        return ReplayCache()

    def cache_length(self, cache: ReplayCache) -> int:
        return len(cache.tokens)

    def forward(self, cache: ReplayCache, pending: list[int], tree: DraftTree, aux: AuxRows | None = None, output_hidden_states: bool = False):
        cache.row_tokens = list(pending) + list(tree.tokens)
        layout = Layout.of(len(pending), tree, aux)
        tree_keys, aux_keys = _row_keys(cache.tokens, pending, tree, aux)
        if not output_hidden_states and all(k in self.rows for k in tree_keys + aux_keys):
            self.hits += 1
            cache.real_has_rows = False
            aux_logits = torch.stack([self.rows[k] for k in aux_keys]) if aux_keys else None
            return VerifyOutput(torch.stack([self.rows[k] for k in tree_keys]), aux_logits, None, layout)
        self.misses += 1
        prompt = self.prompt
        if self.defer and prompt and len(cache.tokens) + len(pending) >= len(prompt) and (list(cache.tokens) + list(pending))[: len(prompt)] == prompt:
            signature = (tuple(tree_keys), tuple(aux_keys))
            if signature not in self.deferred_signatures:  # many generations miss the same forward
                self.deferred_signatures.add(signature)
                aux_copy = None if aux is None else AuxRows(aux.embeds.detach().to("cpu", torch.float32).clone(), list(aux.anchor), list(aux.offset), list(aux.sees))
                self.deferred.append(_Deferred(tuple(cache.tokens) + tuple(pending), DraftTree(list(tree.tokens), list(tree.parents)), aux_copy))
            raise ReplayMiss
        if cache.real is None:
            cache.real = self._real_cache(cache.tokens)
        out = self.inner.forward(cache.real, pending, tree, aux, output_hidden_states)
        cache.real_has_rows = True
        for k, row in zip(tree_keys, out.logits):
            self.rows.setdefault(k, row.clone())
        for k, row in zip(aux_keys, out.aux_logits if aux_keys else []):
            self.rows.setdefault(k, row.clone())
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

    def warm(self, prompt: list[int], depth: int, min_prob: float, rows_per_forward: int = 64) -> int:
        """Compute ahead, in a few tree forwards of up to `rows_per_forward` nodes each, the rows of
        every continuation of `prompt` of up to `depth` tokens whose probability (at temperature
        1) is at least `min_prob`: the rows most generations visit. Returns the rows added."""
        before, self.prompt = len(self.rows), None  # no deferring here
        cache = self.new_cache()
        self.forward(cache, list(prompt), DraftTree())
        self.commit(cache, 0, list(range(len(prompt))))  # saves the prompt's real cache: a miss starts from it
        frontier = [((), 1.0)]  # (continuation, its probability)
        for _ in range(depth):
            grown = []
            for cont, prob in frontier:
                probs = self.rows[tuple(prompt) + cont].float().softmax(-1)  # [vocab]
                grown += [(cont + (t,), prob * float(probs[t])) for t in torch.nonzero(probs * prob >= min_prob).flatten().tolist()]
            for start in range(0, len(grown), rows_per_forward):  # the new rows: a tree of paths
                tree, node = DraftTree(), {}
                for cont, _ in grown[start : start + rows_per_forward]:
                    for i in range(len(cont)):
                        if cont[: i + 1] not in node:
                            node[cont[: i + 1]] = tree.add(cont[i], node[cont[:i]] if i else ROOT)
                self.forward(self.new_cache(), list(prompt), tree)
            frontier = grown
        self.prompt = list(prompt)
        return len(self.rows) - before

    def run_deferred(self, rows_per_forward: int = 192) -> int:
        """Compute the rows of every deferred forward, merged into tree forwards rooted at the
        prompt's last token; returns the forwards run."""
        jobs, self.deferred, self.deferred_signatures = self.deferred, [], set()
        base, root_token = self.prompt[:-1], self.prompt[-1]
        forwards, tree, node, embeds, anchors, offsets, sees, aux_row = 0, DraftTree(), {}, [], [], [], [], {}

        def place(path: tuple[int, ...]) -> int:  # the node of a continuation of the prompt (ROOT for none)
            if not path:
                return ROOT
            if path not in node:
                node[path] = tree.add(path[-1], place(path[:-1]))
            return node[path]

        def flush():
            nonlocal forwards, tree, node, embeds, anchors, offsets, sees, aux_row
            if len(tree) or anchors:
                aux = AuxRows(torch.stack(embeds), anchors, offsets, sees) if anchors else None
                real = self._real_cache(base)
                out = self.inner.forward(real, [root_token], tree, aux)
                tree_keys, aux_keys = _row_keys(base, [root_token], tree, aux)
                for k, row in zip(tree_keys, out.logits):
                    self.rows.setdefault(k, row.clone())
                for k, row in zip(aux_keys, out.aux_logits if aux_keys else []):
                    self.rows.setdefault(k, row.clone())
                forwards += 1
            tree, node, embeds, anchors, offsets, sees, aux_row = DraftTree(), {}, [], [], [], [], {}

        for job in jobs:
            if len(tree) + len(anchors) + len(job.context) - len(self.prompt) + len(job.tree) + (len(job.aux) if job.aux else 0) > rows_per_forward:
                flush()
            path = job.context[len(self.prompt) :]
            root = place(path)
            paths = []
            for token, parent in zip(job.tree.tokens, job.tree.parents):
                paths.append((paths[parent] if parent != ROOT else path) + (token,))
                place(paths[-1])
            if job.aux is not None:
                mapped: list[int] = []  # the job's auxiliary rows -> rows of the merged forward
                for j in range(len(job.aux)):
                    a = job.aux.anchor[j]
                    key = (root if a == ROOT else node[paths[a]], job.aux.offset[j], tuple(mapped[s] for s in job.aux.sees[j]), job.aux.embeds[j].numpy().tobytes())
                    if key not in aux_row:  # rows equal to one already placed are placed once
                        aux_row[key] = len(anchors)
                        embeds.append(job.aux.embeds[j])
                        anchors.append(key[0])
                        offsets.append(key[1])
                        sees.append(key[2])
                    mapped.append(aux_row[key])
        flush()
        return forwards

    # -- the rest passes through -------------------------------------------------------------
    def __getattr__(self, name):  # embed, embedding_stats, cost_curve, observe_tokens, drafter_state, ...
        return getattr(self.inner, name)


def _row_keys(cached: list[int], pending: list[int], tree: DraftTree, aux: AuxRows | None) -> tuple[list[tuple], list[tuple]]:
    """The context of each logits row (the root, then each node) and of each auxiliary row: the
    tokens it sees, in order (an auxiliary row: its anchor's context, then its offset, the
    auxiliary rows it sees and its input embedding)."""
    root = tuple(cached) + tuple(pending)
    node_keys: list[tuple] = []
    for token, parent in zip(tree.tokens, tree.parents):
        node_keys.append((node_keys[parent] if parent != ROOT else root) + (token,))
    aux_keys: list[tuple] = []
    if aux is not None and len(aux):
        embeds = aux.embeds.detach().to("cpu", torch.float32)
        for j in range(len(aux)):
            anchor = root if aux.anchor[j] == ROOT else node_keys[aux.anchor[j]]
            seen = tuple(aux_keys[s] for s in aux.sees[j])
            aux_keys.append((anchor, "aux", aux.offset[j], seen, embeds[j].numpy().tobytes()))
    return [root] + node_keys, aux_keys
