"""The drafter protocol: what a speculative method must provide to the decoding loop.

A drafter proposes, each step, a tree of candidate continuations of the committed text (and,
optionally, auxiliary rows it wants the target to process in the same forward), then observes
what the target accepted. It never changes which tokens are emitted: the verifier decides that.

    set_tokenizer(tokenizer)  before generation: the target's tokenizer (for drafters that need text)
    start(session)            once, after the prompt is known
    propose(session)          -> Proposal(tree, aux)
    observe(session, step)    after the target's verdict (StepResult)
    finish()                  after generation (e.g. to save what the drafter learned)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tree import AuxRows, DraftTree
from ..verify import VerifyOutput


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
    proposal: Proposal
    output: VerifyOutput
    acceptance: Acceptance
    emitted: list[int]  # tokens actually committed this step (acceptance.tokens, cut at EOS / length)


class Drafter:
    """Base class; `ar` (plain decoding) is this class itself: it proposes nothing."""

    name = "ar"

    def set_tokenizer(self, tokenizer) -> None:  # protocol hook
        pass

    def start(self, session) -> None:  # noqa: D401 - protocol hook
        pass

    def propose(self, session) -> Proposal:
        return Proposal()

    def observe(self, session, step: StepResult) -> None:
        pass

    def finish(self) -> None:  # protocol hook
        pass
