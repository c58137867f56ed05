"""The llama.cpp backend: a GGUF model on llama.cpp as the engine's `Backend`.

Every generation (every cache) is one sequence of the model's context. A verification forward is
one `llama_decode` over the pending tokens, the tree and the auxiliary rows, the tree expressed as
sequence sets (sequences.py): each branch a sequence that the committed text is copied into
first (metadata only), each row carrying the sequences of the rows that must see it. The rows'
logits come back for the root onward. Commit keeps the pending rows and the accepted path in the
generation's sequence (one `llama_memory_seq_cp` over the path's positions) and drops every
branch sequence, which frees the cells of the rejected rows. Nothing is copied or recomputed.

A forward with auxiliary rows (ESP's masks, lookahead's window) is a batch of embedding rows
(llama.cpp takes a batch of token ids or of embeddings, not both): token rows are then their rows
of the de-quantised embedding table, which gives llama.cpp's own token input exactly.

Prompts longer than a batch go in llama.cpp's batch size (512), as llama-cpp-python feeds them.

With `streams` > 1 (batched serving, engine/batch.py) every generation has a KV stream of its own
(llama.cpp's non-unified cache, its server's slots) and `forward_many` runs the roots and chains of
all of them in shared decodes: a row's logits are then bit-identical to its generation running
alone (measured: a stream's cells sit where they would alone; interleaved cells in one shared
store changed logits by up to 1.1). Branch sequences cannot span streams, so this mode runs no
auxiliary rows (ESP's masks, lookahead's window): their logits are zeros, and the hybrid drafts
without them (`runs_aux_rows`).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from ...engine.cost_curve import measure_cost_curve
from ...engine.protocol import ForwardRequest, VerifyOutput
from ...engine.tree import AuxRows, DraftTree, Layout, rows_structure
from ...errors import InvalidOptionError
from ...store import atomic_write, cache_root, file_name
from .library import llama
from .model import N_BATCH, N_SEQ_MAX, LlamaCppModel
from .sequences import assign_sequences

CURVE_VERSION = 1
PROBE_QS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # batch sizes tried by the batch-invariance probe


@dataclass
class _Open:
    """What the last forward(s) left uncommitted in a cache."""

    past: int  # the cache length before them
    first_row: int  # index, counted from `past`, of the first row of the last batch
    positions: list[int] = field(default_factory=list)  # of the last batch's rows
    views: list[int] = field(default_factory=list)  # each row's view sequence
    branches: list[int] = field(default_factory=list)  # branch sequences to drop at commit (empty: a chain on the cache's own sequence)
    n_pending: int = 0  # the rows, counted from `past`, before the last forward's draft rows
    chain: list[int] | None = None  # the last forward's tree nodes on the generation's sequence (its main chain), in order; None: plain decoding


class LlamaCppCache:
    """One generation's place in the context: a sequence id and the positions it holds."""

    def __init__(self, seq: int):
        self.seq = seq
        self.length = 0
        self.open: _Open | None = None
        self.released = False


class _Batch:
    """A llama_batch with numpy views of its arrays."""

    def __init__(self, capacity: int, n_embd: int = 0):
        L = llama()
        self.raw = L.llama_batch_init(capacity, n_embd, N_SEQ_MAX)
        self.capacity = capacity
        self.pos = np.ctypeslib.as_array(self.raw.pos, shape=(capacity,))
        self.n_seq_id = np.ctypeslib.as_array(self.raw.n_seq_id, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(self.raw.logits, shape=(capacity,))
        self.seq_id = [np.ctypeslib.as_array(self.raw.seq_id[i], shape=(N_SEQ_MAX,)) for i in range(capacity)]
        self.token = np.ctypeslib.as_array(self.raw.token, shape=(capacity,)) if not n_embd else None
        self.embd = np.ctypeslib.as_array(self.raw.embd, shape=(capacity, n_embd)) if n_embd else None

    def fill(self, positions: list[int], seqs: list[list[int]], out_from: int) -> None:
        n = len(positions)
        self.raw.n_tokens = n
        self.pos[:n] = positions
        self.logits[:n] = 0
        self.logits[out_from:n] = 1
        for i, s in enumerate(seqs):
            self.n_seq_id[i] = len(s)
            self.seq_id[i][: len(s)] = s

    def free(self) -> None:
        if self.raw is not None:
            llama().llama_batch_free(self.raw)
            self.raw = None


class LlamaCppBackend:
    """The target as the engine sees it, on llama.cpp."""

    name = "llamacpp"
    supports_hidden_states = False
    verifies_trees = False  # see forward
    dtype = torch.float32
    device = torch.device("cpu")

    @classmethod
    def of(cls, model: LlamaCppModel) -> "LlamaCppBackend":
        """The backend of `model`, built once and kept by the model."""
        if model._backend is None:
            model._backend = cls(model)
        return model._backend

    def __init__(self, model: LlamaCppModel):
        self._model = weakref.ref(model)  # the model owns this backend
        self.path = model.path
        self.settings = model.settings
        self.threads = model.threads
        self.vocab_size = model.vocab_size
        self.hidden_size = model.hidden_size
        self.max_length = model.max_length
        self._ctx = model.context
        self._memory = model.memory
        self.streams = model.streams  # generations that may be open at once (1: any number, one after another)
        self.runs_aux_rows = self.streams == 1  # mask rows need branch sequences, which a stream of its own cannot share
        # sequence ids, caches' and branches' alike (with streams: one per stream, no branches)
        self._free = list(range((N_SEQ_MAX if self.streams == 1 else self.streams) - 1, -1, -1))
        self._tokens = _Batch(N_BATCH)
        self._embeds: _Batch | None = None
        self._cost_curve: dict[int, float] | None = None
        self._max_rows: int | None = None
        self._measuring = False
        self._alive = 0  # caches not yet released
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._drafter_state: dict = {}

    @property
    def model(self) -> LlamaCppModel:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this LlamaCppBackend was freed")
        return model

    def close(self) -> None:
        self._tokens.free()
        if self._embeds is not None:
            self._embeds.free()

    # -- sequences ------------------------------------------------------------------------------
    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            if self.streams > 1:
                raise RuntimeError(f"all {self.streams} streams of this llama.cpp context are in use: release a generation first")
            raise RuntimeError(f"llama.cpp context out of sequences ({N_SEQ_MAX}): a tree of {n} branches does not fit")
        return [self._free.pop() for _ in range(n)]

    def _drop(self, seqs: list[int]) -> None:
        L = llama()
        for s in seqs:
            L.llama_memory_seq_rm(self._memory, s, -1, -1)
            self._free.append(s)

    def new_cache(self) -> LlamaCppCache:
        if not self._measuring and (self._max_rows is None or self._cost_curve is None):
            # measured (or read) before any generation holds cells: a measurement's rows among a
            # generation's would move that generation's tokens off the cells plain decoding gives them
            self._measuring = True
            try:
                self.max_rows()
                self.cost_curve()
            finally:
                self._measuring = False
        if not self._alive and self.streams == 1:
            # an empty context starts over at its first cell: where a generation's cells sit must
            # not depend on what ran before (llama.cpp's sums run in cell order)
            llama().llama_memory_clear(self._memory, True)
        (seq,) = self._take(1)
        llama().llama_memory_seq_rm(self._memory, seq, -1, -1)  # a stream emptied starts over at its first cell
        self._alive += 1
        return LlamaCppCache(seq)

    def cache_length(self, cache: LlamaCppCache) -> int:
        return cache.length

    def release(self, cache: LlamaCppCache) -> None:
        if cache.released:
            return
        if cache.open is not None:
            self._drop(cache.open.branches)
        self._drop([cache.seq])
        cache.released = True
        self._alive -= 1

    # -- one forward --------------------------------------------------------------------------
    def _decode(self, batch: _Batch, n_out: int) -> torch.Tensor:
        L = llama()
        rc = L.llama_decode(self._ctx, batch.raw)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc} ({'no room left in the KV cache' if rc == 1 else 'see llama.cpp'})")
        if not n_out:
            return torch.empty(0, self.vocab_size)
        logits = np.ctypeslib.as_array(L.llama_get_logits(self._ctx), shape=(n_out, self.vocab_size))
        return torch.from_numpy(logits.copy())  # [n_out, vocab]

    def _feed_tokens(self, cache: LlamaCppCache, tokens: list[int], logits_of_last: bool) -> torch.Tensor | None:
        """Committed tokens into the cache, on the generation's own sequence, in chunks of the
        batch size (as plain decoding feeds a prompt); the logits of the last one, if asked."""
        out = None
        for start in range(0, len(tokens), N_BATCH):
            chunk = tokens[start : start + N_BATCH]
            want = logits_of_last and start + len(chunk) == len(tokens)
            self._tokens.token[: len(chunk)] = chunk
            self._tokens.fill(list(range(cache.length, cache.length + len(chunk))), [[cache.seq]] * len(chunk), len(chunk) - 1 if want else len(chunk))
            out = self._decode(self._tokens, 1 if want else 0)
            cache.length += len(chunk)
        return out

    @staticmethod
    def verified_part(tree: DraftTree, aux: AuxRows | None) -> tuple[list[int], list[int]]:
        """(tree nodes, auxiliary rows) a forward computes: the tree's main chain, and the auxiliary
        rows anchored to the root or to it that see only such rows.

        >>> tree = DraftTree([5, 6, 7], [-1, -1, 0])       # main chain 0 -> 2; node 1 beside it
        >>> aux = AuxRows(torch.zeros(3, 4), [-1, 1, 2], [1, 1, 1], [(), (), ()])
        >>> LlamaCppBackend.verified_part(tree, aux)
        ([0, 2], [0, 2])
        """
        chain = tree.main_chain()
        on_chain = {-1, *chain}
        kept_aux: list[int] = []
        if aux is not None:
            for j in range(len(aux)):
                if aux.anchor[j] in on_chain and all(s in kept_aux for s in aux.sees[j]):
                    kept_aux.append(j)
        return chain, kept_aux

    @torch.inference_mode()
    def forward(self, cache: LlamaCppCache, pending: list[int], tree: DraftTree, aux: AuxRows | None = None, output_hidden_states: bool = False) -> VerifyOutput:
        """pending, then the tree's main chain and the auxiliary rows beside it (`verified_part`;
        the other rows' logits are zeros and the loop accepts along the chain only).

        Each row computes exactly what plain decoding computes for it. llama.cpp's numbers depend
        on how many rows share a batch and on which KV cell a row sits in (float16 sums over the
        cells in cell order), so: several pending tokens (a prompt) go in as plain decoding feeds
        them; the root and the draft rows go in batches of at most `max_rows()` rows, the most
        that keeps every row's logits bit-identical on this build and model; and the chain's rows
        come first, so that its tokens take the cells plain decoding would give them, and a
        commit, which keeps a prefix of the chain, leaves the cache laid out as plain decoding
        leaves it. Branches beside the chain would take those cells from it: they are not run."""
        if output_hidden_states:
            raise InvalidOptionError("the llamacpp backend exposes no hidden states (methods eagle and confu need the torch backend)")
        layout = Layout.of(len(pending), tree, aux)
        open_ = cache.open
        if open_ is not None and open_.branches:
            raise RuntimeError("commit the last verification forward before the next one")
        past = open_.past if open_ is not None else cache.length
        chain, kept_aux = self.verified_part(tree, aux if self.runs_aux_rows else None)
        root_apart = len(pending) > 1 or not (chain or kept_aux)
        root_logits = self._feed_tokens(cache, pending, logits_of_last=True) if root_apart else None
        if root_apart and not (chain or kept_aux):  # plain decoding
            cache.open = _Open(past, cache.length - 1 - past, [cache.length - 1], [cache.seq], [], cache.length - past, None)
            return VerifyOutput(torch.cat([root_logits, torch.zeros(len(tree), self.vocab_size)]), None if aux is None or not len(aux) else torch.zeros(len(aux), self.vocab_size), None, layout)
        node_index = {n: k for k, n in enumerate(chain)}
        sub_tree = DraftTree([tree.tokens[n] for n in chain], list(range(-1, len(chain) - 1)))
        sub_aux = None
        if kept_aux:
            aux_index = {j: k for k, j in enumerate(kept_aux)}
            sub_aux = AuxRows(aux.embeds[kept_aux], [node_index.get(aux.anchor[j], -1) if aux.anchor[j] != -1 else -1 for j in kept_aux],
                              [aux.offset[j] for j in kept_aux], [tuple(aux_index[s] for s in aux.sees[j]) for j in kept_aux])
        sub = Layout.of(1, sub_tree, sub_aux)  # the root as the one pending row
        visible, offsets = rows_structure(sub)
        root_pos = cache.length - 1 if root_apart else cache.length
        positions = (offsets + root_pos).tolist()
        sets = assign_sequences(visible.tolist(), positions, 1)
        branches = self._take(sets.n_branches)
        actual = [cache.seq, *branches]
        for s in branches:  # each branch sees the committed text (the root too, when it is in already)
            llama().llama_memory_seq_cp(self._memory, cache.seq, s, -1, -1)
        seqs = [[actual[i] for i in row] for row in sets.rows]
        token_ids = [pending[-1], *sub_tree.tokens]
        embeds = None
        if sub_aux is not None:
            embeds = torch.cat([self.model.embeddings()[token_ids], sub_aux.embeds.detach().float().cpu()]).numpy()  # [rows, hidden]
        start = 1 if root_apart else 0
        pieces = [] if root_logits is None else [root_logits]
        try:
            step = self.max_rows()
            for lo in range(start, sub.n_rows, step):
                hi = min(sub.n_rows, lo + step)
                if embeds is not None:
                    if self._embeds is None:
                        self._embeds = _Batch(N_BATCH, self.hidden_size)
                    batch = self._embeds
                    batch.embd[: hi - lo] = embeds[lo:hi]
                else:
                    batch = self._tokens
                    batch.token[: hi - lo] = [token_ids[r] for r in range(lo, hi)]
                batch.fill(positions[lo:hi], seqs[lo:hi], 0)
                pieces.append(self._decode(batch, hi - lo))
        except RuntimeError:
            self._drop(branches)
            raise
        rows = torch.cat(pieces)  # [1 + chain + kept aux, vocab]: the root onward
        cache.length = root_pos + 1 + len(chain)  # the root and the chain are on the generation's sequence
        cache.open = _Open(past, root_pos - past, positions, [s[0] for s in seqs], branches, root_pos + 1 - past, chain)
        return self._output(rows, tree, aux, chain, kept_aux, layout)

    def _output(self, rows: torch.Tensor, tree: DraftTree, aux: AuxRows | None, chain: list[int], kept_aux: list[int], layout: Layout) -> VerifyOutput:
        """The VerifyOutput of the rows computed (the root, the chain, the kept auxiliary rows):
        the other rows' logits are zeros."""
        logits = torch.zeros(1 + len(tree), self.vocab_size)  # [1 + n, vocab]
        logits[0] = rows[0]
        if chain:
            logits[[1 + n for n in chain]] = rows[1 : 1 + len(chain)]
        aux_logits = None
        if aux is not None and len(aux):
            aux_logits = torch.zeros(len(aux), self.vocab_size)  # [m, vocab]
            if kept_aux:
                aux_logits[kept_aux] = rows[1 + len(chain) :]
        return VerifyOutput(logits, aux_logits, None, layout)

    @torch.inference_mode()
    def forward_many(self, requests: list[ForwardRequest]) -> list[VerifyOutput]:
        """One forward per request, with the rows of every request that has one pending token and
        no auxiliary rows run side by side: each stream's root and main chain, in batches of at
        most `max_rows()` rows (the most that keeps every row's logits bit-identical to a one-row
        decode), each row on its own stream's sequence. Every row then computes exactly what it
        computes when its generation runs alone. A request with a prompt to feed (several pending
        tokens) or with auxiliary rows runs alone, as `forward` runs it."""
        outputs: list[VerifyOutput | None] = [None] * len(requests)
        shared: list[tuple[int, int, list[int]]] = []  # (request, root position, chain)
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[list[int]] = []
        for i, r in enumerate(requests):
            chain, kept_aux = self.verified_part(r.tree, r.aux if self.runs_aux_rows else None)
            if self.streams == 1 or len(r.pending) != 1 or kept_aux or r.cache.open is not None:
                outputs[i] = self.forward(r.cache, r.pending, r.tree, r.aux, r.output_hidden_states)
                continue
            if r.output_hidden_states:
                raise InvalidOptionError("the llamacpp backend exposes no hidden states (methods eagle and confu need the torch backend)")
            root_pos = r.cache.length
            shared.append((i, root_pos, chain))
            tokens += [r.pending[0], *(r.tree.tokens[n] for n in chain)]
            positions += range(root_pos, root_pos + 1 + len(chain))
            seqs += [[r.cache.seq]] * (1 + len(chain))
        if shared:
            pieces = []
            step = self.max_rows()
            for lo in range(0, len(tokens), step):
                hi = min(len(tokens), lo + step)
                self._tokens.token[: hi - lo] = tokens[lo:hi]
                self._tokens.fill(positions[lo:hi], seqs[lo:hi], 0)
                pieces.append(self._decode(self._tokens, hi - lo))
            rows = torch.cat(pieces)  # [all requests' roots and chains, vocab]
            at = 0
            for i, root_pos, chain in shared:
                r = requests[i]
                n = 1 + len(chain)
                r.cache.length = root_pos + n
                r.cache.open = _Open(root_pos, 0, list(range(root_pos, root_pos + n)), [r.cache.seq] * n, [], 1, chain)
                outputs[i] = self._output(rows[at : at + n], r.tree, r.aux, chain, [], Layout.of(1, r.tree, r.aux))
                at += n
        return outputs

    def commit(self, cache: LlamaCppCache, past: int, rows: list[int]) -> None:
        """Keep [0, past) and `rows` (counted from `past`): a prefix of the pending rows and the
        main chain, the rows the last forward(s) put on the generation's sequence."""
        open_, cache.open = cache.open, None
        n_kept = len(rows)
        if open_ is not None and open_.chain is not None:
            if past != open_.past:
                raise ValueError("commit the rows of the last forward from the length before it")
            nodes = [r - open_.n_pending for r in rows if r >= open_.n_pending]
            if rows[: len(rows) - len(nodes)] != list(range(len(rows) - len(nodes))) or nodes != open_.chain[: len(nodes)]:
                raise ValueError("the llamacpp backend keeps a prefix of the pending rows and of the main chain")
            self._drop(open_.branches)
        elif rows != list(range(len(rows))):  # plain decoding (or none since the last commit): keep a prefix
            raise ValueError("the llamacpp backend keeps a prefix of its rows")
        keep = past + n_kept
        llama().llama_memory_seq_rm(self._memory, cache.seq, keep, -1)
        cache.length = min(cache.length, keep)

    # -- what drafters may ask ----------------------------------------------------------------------
    def embed(self, token_ids: list[int]) -> torch.Tensor:
        return self.model.embeddings()[token_ids]  # [len, hidden]

    def embedding_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stats is None:
            table = self.model.embeddings().double()
            self._stats = (table.mean(0).float(), table.std(0, unbiased=False).float())
        return self._stats

    def _measurements_file(self):
        st = self.path.stat()
        s = self.settings
        key = (f"llamacpp-c{CURVE_VERSION}-{self.path.stem}-{st.st_size}-t{self.threads}-fa{int(s.flash_attention)}-x{int(s.extra_bufts)}"
               f"-kv{'32' if s.kv_float32 else '16'}-g{s.gpu_layers}")
        return cache_root() / "cost_curves" / (file_name(key) + ".json")

    def _stored(self) -> dict:
        try:
            return json.loads(self._measurements_file().read_text())
        except (OSError, ValueError):
            return {}

    def _store(self, **entries) -> None:
        atomic_write(self._measurements_file(), json.dumps({**self._stored(), **entries}, indent=1))

    def max_rows(self) -> int:
        """The most rows a batch may hold with every row's logits bit-identical to a one-row
        decode (measured once per machine, file and settings, and saved)."""
        if self._max_rows is None:
            stored = self._stored().get("max_rows")
            self._max_rows = int(stored) if isinstance(stored, int) and stored >= 1 else None
            if self._max_rows is None:
                self._max_rows = self._measure_max_rows()
                self._store(max_rows=self._max_rows)
        return self._max_rows

    @torch.inference_mode()
    def _measure_max_rows(self, prefix: int = 40) -> int:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(100, min(1000, self.vocab_size), (prefix + PROBE_QS[-1],), generator=gen).tolist()
        cache = self.new_cache()
        try:
            self._feed_tokens(cache, ids[:prefix], logits_of_last=False)
            single = []
            for t in ids[prefix:]:
                single.append(self._feed_tokens(cache, [t], logits_of_last=True))
            single = torch.cat(single)  # [64, vocab]: one row per decode
            best = 1
            for q in PROBE_QS:
                llama().llama_memory_seq_rm(self._memory, cache.seq, prefix, -1)
                cache.length = prefix
                chunk = ids[prefix : prefix + q]
                self._tokens.token[:q] = chunk
                self._tokens.fill(list(range(prefix, prefix + q)), [[cache.seq]] * q, 0)
                batched = self._decode(self._tokens, q)
                if not torch.equal(batched, single[:q]):
                    break
                best = q
            return best
        finally:
            self.release(cache)

    def cost_curve(self) -> dict[int, float]:
        """T(q) on this machine for this file and settings (verification rows split into batches
        of `max_rows()`): read from disk, or measured once and saved."""
        if self._cost_curve is None:
            stored = self._stored().get("seconds")
            try:
                self._cost_curve = {int(q): float(t) for q, t in stored.items()}
            except (AttributeError, ValueError, TypeError):
                self.max_rows()
                times, is_steady = measure_cost_curve(self)
                if is_steady:
                    self.set_cost_curve(times)
                else:  # this process uses it; the next one measures again
                    self._cost_curve = times
        return self._cost_curve

    def set_cost_curve(self, times: dict[int, float]) -> None:
        self._cost_curve = dict(times)
        self._store(seconds={str(q): t for q, t in sorted(times.items())})

    def observe_tokens(self, token_ids: list[int]) -> None:
        """Nothing learnt across requests on this backend."""

    def learning_scope(self, name: str):
        return None

    def for_model(self, model, layers: int | None = None):
        """The backend of a draft model: its own on llama.cpp, a torch backend for a torch module."""
        if hasattr(model, "model") and hasattr(model, "tokenizer"):  # a LoadedModel
            model = model.model
        if isinstance(model, LlamaCppModel):
            if layers is not None and layers < model.n_layer:
                raise InvalidOptionError("llama.cpp runs whole models: a drafter of its first N layers (draft_layers, truncated:N) needs the torch backend")
            return LlamaCppBackend.of(model)
        from ..torch import TorchBackend  # a torch drafter beside a llama.cpp target

        return TorchBackend.of(model).for_model(model, layers)

    def drafter_state(self) -> dict:
        return self._drafter_state
