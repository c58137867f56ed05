"""A tiny deterministic target behind the engine's Backend protocol, for testing the loop itself.

The "model" is a rule: after a sequence s, the next token is `rule(s)` = (3 s[-1] + 2 s[-2] + 1) % VOCAB,
so every row's logits depend on the tokens that row may see (the cache, the pending chain, its
tree ancestors): a row that saw the wrong tokens predicts the wrong token. Its text repeats with a
period of 32 tokens, so copying drafters find matches. The cache records the token of every row
it holds, so a test can check that exactly the right rows were kept. Auxiliary rows get flat
logits.
"""

from __future__ import annotations

import torch

from specprobe.engine.protocol import VerifyOutput
from specprobe.engine.tree import ROOT, AuxRows, DraftTree, Layout

VOCAB = 32
HIDDEN = 4


def rule(seq: list[int]) -> int:
    return (3 * seq[-1] + 2 * (seq[-2] if len(seq) > 1 else 0) + 1) % VOCAB


def reference(prompt: list[int], n: int, eos: set[int] = frozenset()) -> list[int]:
    """What plain greedy decoding of the rule gives: n tokens, or up to and with the first EOS."""
    seq, out = list(prompt), []
    while len(out) < n:
        tok = rule(seq)
        seq.append(tok)
        out.append(tok)
        if tok in eos:
            break
    return out


class FakeCache:
    def __init__(self):
        self.tokens: list[int | None] = []  # one entry per position held (None: an auxiliary row)
        self.released = False


class FakeBackend:
    name = "fake"
    vocab_size = VOCAB
    hidden_size = HIDDEN
    dtype = torch.float32
    device = torch.device("cpu")
    supports_hidden_states = False
    verifies_trees = True

    def __init__(self, max_length: int = 256):
        self.max_length = max_length
        self.forwards: list[Layout] = []  # the layout of every forward, in order
        self.caches: list[FakeCache] = []
        self.observed: list[int] = []
        self.state: dict = {}

    # -- the KV cache ---------------------------------------------------------------------------
    def new_cache(self) -> FakeCache:
        cache = FakeCache()
        self.caches.append(cache)
        return cache

    def cache_length(self, cache: FakeCache) -> int:
        return len(cache.tokens)

    def commit(self, cache: FakeCache, past: int, rows: list[int]) -> None:
        assert rows == sorted(rows) and all(past + r < len(cache.tokens) for r in rows)
        cache.tokens = cache.tokens[:past] + [cache.tokens[past + r] for r in rows]
        assert None not in cache.tokens, "an auxiliary row was kept in the cache"

    def release(self, cache: FakeCache) -> None:
        cache.released = True

    # -- one forward ------------------------------------------------------------------------------
    def forward(self, cache: FakeCache, pending: list[int], tree: DraftTree, aux: AuxRows | None = None, output_hidden_states: bool = False) -> VerifyOutput:
        assert not cache.released
        layout = Layout.of(len(pending), tree, aux)
        self.forwards.append(layout)
        past = [t for t in cache.tokens]
        assert None not in past, "the cache still holds rows of an earlier forward"
        rows = []  # the sequence each logits row sees
        for i in range(len(pending)):
            rows.append(past + pending[: i + 1])
        seen_by_node = []
        for i, parent in enumerate(tree.parents):
            before = past + pending if parent == ROOT else seen_by_node[parent]
            seen_by_node.append(before + [tree.tokens[i]])
        logits = torch.zeros(1 + len(tree), VOCAB)  # [1 + n, vocab]: the root, then every node
        logits[0, rule(rows[-1])] = 10.0
        for i, seq in enumerate(seen_by_node):
            logits[1 + i, rule(seq)] = 10.0
        n_aux = len(aux) if aux is not None else 0
        cache.tokens += list(pending) + list(tree.tokens) + [None] * n_aux
        aux_logits = torch.zeros(n_aux, VOCAB) if n_aux else None
        return VerifyOutput(logits, aux_logits, None, layout)

    # -- what drafters may ask ----------------------------------------------------------------------
    def embed(self, token_ids: list[int]) -> torch.Tensor:
        return torch.tensor([[float(t), 1.0, 0.0, -1.0] for t in token_ids])  # [len, hidden]

    def embedding_stats(self):
        e = self.embed(list(range(VOCAB)))
        return e.mean(0), e.std(0)

    def cost_curve(self) -> dict[int, float]:
        return {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0, 32: 1.0, 64: 1.0}  # rows cost nothing extra

    def observe_tokens(self, token_ids: list[int]) -> None:
        self.observed += list(token_ids)

    def learning_scope(self, name: str):
        return None

    def for_model(self, model, layers: int | None = None):
        return self

    def drafter_state(self) -> dict:
        return self.state
