"""The engine's two protocols: a `Backend` runs the target, a `Drafter` proposes what it verifies.

Speculative decoding as four named steps (Medusa's naming), every method alike:

    1. propose   drafter.propose(session) -> Proposal: a tree of candidates (and auxiliary rows)
    2. verify    backend.forward(cache, pending, tree, aux) -> VerifyOutput: one target forward
    3. accept    sampling.accept(tree, logits) -> Acceptance: accepted nodes + recovered/bonus token
    4. commit    backend.commit(cache, past, kept rows); drafter.observe(session, StepResult)

A drafter never changes which tokens are emitted: the verifier decides that. The loop
(decode.py) owns the whole lifecycle of a drafter in one generation:

    start(session)            once, after the prompt is known
    propose(session)          -> Proposal, before each target forward that has room for drafts
    observe(session, step)    after each target forward, with its StepResult (also after a step
                              whose drafts were dropped: `step.drafts_dropped` says so)
    finish(session)           once, after the last step (e.g. to learn from or save the request)

A backend is one way of running the target model (backends/torch: a Hugging Face module in
PyTorch; backends/llamacpp: a GGUF file on llama.cpp). The engine talks to the target only
through it: the KV cache is the backend's own object, which the engine creates, passes back and
releases but never looks into. Several generations may hold caches at once (batched serving,
engine/batch.py); a backend may then run their forwards together through an optional
`forward_many(list[ForwardRequest]) -> list[VerifyOutput]`, which must give each request exactly
what `forward` gives it alone, and may limit how many caches are open at once (`streams`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .tree import AuxRows, DraftTree, Layout


@dataclass
class VerifyOutput:
    """What one target forward returns."""

    logits: torch.Tensor  # [1 + n_nodes, vocab]: row 0 is the root (last pending token), row 1 + i node i
    aux_logits: torch.Tensor | None  # [n_aux, vocab] or None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer, [1, q, hidden], when asked
    layout: Layout | None = None


@dataclass
class ForwardRequest:
    """The arguments of one `Backend.forward`, for a backend that runs several at once."""

    cache: Any
    pending: list[int]
    tree: DraftTree
    aux: AuxRows | None = None
    output_hidden_states: bool = False


def forward_all(backend, requests: list[ForwardRequest]) -> list[VerifyOutput]:
    """One forward per request: together where the backend offers `forward_many` (llama.cpp with
    several streams, torch), else one after another."""
    many = getattr(backend, "forward_many", None)
    if many is not None and len(requests) > 1:
        return many(requests)
    return [backend.forward(r.cache, r.pending, r.tree, r.aux, r.output_hidden_states) for r in requests]


@runtime_checkable
class Backend(Protocol):
    """The target as the engine sees it. Implementations: backends/torch, backends/llamacpp;
    tests/fake_backend.py is a deterministic toy."""

    name: str  # "torch", "llamacpp"
    vocab_size: int  # rows of the LM head (logits per row)
    max_length: int  # context length in tokens
    hidden_size: int  # width of an embedding row (auxiliary rows carry such rows)
    dtype: torch.dtype  # of the embedding rows it takes
    device: torch.device
    supports_hidden_states: bool  # forward(..., output_hidden_states=True) works (EAGLE, ConFu)
    verifies_trees: bool  # False: forward verifies only the tree's main chain (tree.main_chain()), whose rows
    # alone it computes exactly as plain decoding would; the loop then accepts along that chain only

    def new_cache(self) -> Any:
        """An empty KV cache for one generation (the backend's own object)."""

    def cache_length(self, cache) -> int:
        """Positions the cache holds."""

    def forward(self, cache, pending: list[int], tree: DraftTree, aux: AuxRows | None = None, output_hidden_states: bool = False) -> VerifyOutput:
        """One forward over [pending][tree nodes][aux rows] after the cache; the cache then holds
        every one of those rows until `commit`. A backend that does not verify trees computes the
        main chain's rows and the auxiliary rows that see only it (the other rows' logits are
        zeros, never read)."""

    def commit(self, cache, past: int, rows: list[int]) -> None:
        """Keep positions [0, past) and the rows `rows` of the last forward (indices counted from
        `past`, increasing), moved to be contiguous after `past`; drop the rest."""

    def release(self, cache) -> None:
        """The generation is over: free what the cache holds (llama.cpp's sequence ids)."""

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Input embeddings as the model computes them, [len, hidden] (any input scale included)."""

    def embedding_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and standard deviation of every token's input embedding, [hidden] each."""

    def cost_curve(self) -> dict[int, float]:
        """Seconds per forward of q rows on this machine (measured once, then read)."""

    def observe_tokens(self, token_ids: list[int]) -> None:
        """Tokens the engine served (a prompt, a step's committed tokens), for what the backend
        learns across requests (the torch backend's reduced draft vocabulary); may do nothing."""

    def learning_scope(self, name: str) -> Any:
        """Switch what `observe_tokens` learns across requests to the scope `name` (the bench
        gives each method its own); may do nothing."""

    def for_model(self, model, layers: int | None = None) -> "Backend":
        """A backend of the same kind for another model (a draft model), or for its first
        `layers` decoder layers and its head; built once per model and kept by that model."""

    def drafter_state(self) -> dict:
        """A dict kept with this backend's model for drafters' caches that outlive a generation
        (trained heads and their kernel plans, vocabulary bridges, adapters)."""


@dataclass
class Proposal:
    tree: DraftTree = field(default_factory=DraftTree)
    aux: AuxRows | None = None
    draft_probs: torch.Tensor | None = None  # [n_nodes, vocab]: the distribution each node was sampled from (sampling drafters only)
    needs_hidden_states: bool = False  # the drafter reads the target's per-layer hidden states in `observe`


@dataclass
class Acceptance:
    """The verdict on a tree: the accepted nodes and the tokens emitted.

    tokens = the accepted tokens followed by one token from the target after the last accepted
    one (a recovered token if a candidate there was rejected, else a bonus token; see
    sampling.py), so len(tokens) == len(path) + 1.
    """

    path: list[int]  # accepted tree nodes, root excluded, in order
    tokens: list[int]
    recovered: bool = False  # the final token replaced a rejected candidate (else it is a bonus token)

    @property
    def bonus(self) -> int:
        return self.tokens[-1]


@dataclass
class StepResult:
    proposal: Proposal  # what was verified (empty when the drafts were dropped)
    output: VerifyOutput
    acceptance: Acceptance
    emitted: list[int]  # tokens actually committed this step (acceptance.tokens, cut at EOS / length / a stop)
    drafts_dropped: bool = False  # the loop verified no drafts this step: the last token, or no room left in the context


class Drafter:
    """Base class; `ar` (plain decoding) is this class itself: it proposes nothing. `session` is
    the loop's `decode.Session` (the target, its tokenizer, the committed tokens, sampling)."""

    name = "ar"

    def start(self, session) -> None:
        pass

    def propose(self, session) -> Proposal:
        return Proposal()

    def observe(self, session, step: StepResult) -> None:
        pass

    def finish(self, session) -> None:
        pass
