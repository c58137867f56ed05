"""The decoding loop: propose -> verify (one target forward over a tree) -> accept -> commit.

The loop is the same for every method and every backend; a method is a drafter and the target is
a backend (protocol.py). Plain decoding (`ar`) is the drafter that proposes nothing, so every
speed ratio specprobe reports compares two runs of this one loop.

Counting: every target forward is one step, the first one included (it processes the prompt and
emits the first token, like the prefill of `model.generate`). tau = new tokens / target forwards,
so plain decoding has tau = 1 exactly.

Stopping: at EOS (`eos`), at `max_new_tokens` (`length`), at the end of the model's context
(`context`), or when the caller's `on_tokens` callback returns True (`stop`: a stop string found,
a client gone, a deadline passed). Every way out runs the drafter's `finish` and releases the
cache.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..errors import PromptTooLongError
from .protocol import Backend, Drafter, ForwardRequest, Proposal, StepResult, VerifyOutput
from .sampling import PositionNoise, SamplingConfig, accept
from .tree import Layout


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    accept_lengths: list[int] = field(default_factory=list)  # tokens emitted per target forward
    draft_sizes: list[int] = field(default_factory=list)  # tree nodes proposed per forward
    step_rows: list[int] = field(default_factory=list)  # rows per forward (root, nodes, auxiliary; the prompt counts 1)
    wall_time: float = 0.0
    draft_time: float = 0.0  # in the drafter's propose/observe
    verify_time: float = 0.0  # in target forwards and acceptance
    adapt_time: float = 0.0  # in the drafter's `finish` after the request (omnidraft: online distillation); part of wall_time

    @property
    def tau(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tau"] = self.tau
        d["tokens_per_s"] = self.tokens_per_s
        return d


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    prompt_ids: list[int]
    stats: GenerationStats
    stop_reason: str  # "eos", "length", "context" or "stop" (the caller's on_tokens asked to stop)
    method: str = "ar"

    def to_dict(self) -> dict:
        s = self.stats
        return {
            "text": self.text,
            "method": self.method,
            "new_tokens": s.new_tokens,
            "target_forwards": s.target_forwards,
            "tau": s.tau,
            "accept_lengths": s.accept_lengths,
            "wall_time": s.wall_time,
            "tokens_per_s": s.tokens_per_s,
            "draft_time": s.draft_time,
            "verify_time": s.verify_time,
            "adapt_time": s.adapt_time,
            "prompt_tokens": s.prompt_tokens,
            "stop_reason": self.stop_reason,
            "token_ids": self.token_ids,
        }


class Session:
    """What a drafter may read during one generation: the target (a Backend), the target's
    tokenizer (None when the caller gave token ids only), the committed tokens, the sampling
    settings and their coupled noise."""

    def __init__(self, target: Backend, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None, tokenizer=None):
        self.target = target
        self.tokenizer = tokenizer
        self.sampling = sampling or SamplingConfig()  # temperature 0: greedy
        self.generator = None if self.sampling.greedy else self.sampling.generator()
        self.noise = None if self.sampling.greedy else PositionNoise(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
        self.prompt_len = len(prompt_ids)
        self.ids: list[int] = list(prompt_ids)  # committed tokens: prompt + generated
        self.pending: list[int] = list(prompt_ids)  # committed but not yet in the cache
        self.cache = target.new_cache()
        self.max_new_tokens = max_new_tokens
        # what the other generations of a shared forward ran and emitted last step (engine/batch.py):
        # the budget prices this one's tree after their rows and counts their tokens (0 alone)
        self.rows_beside = 0
        self.tokens_beside = 0.0

    @property
    def generated(self) -> list[int]:
        return self.ids[self.prompt_len :]

    @property
    def cache_len(self) -> int:
        return self.target.cache_length(self.cache)


def cut_at_stop(tokens: list[int], remaining: int, room: int, eos_ids: set[int]) -> tuple[list[int], bool]:
    """A step's tokens cut to the length and context left, and at the first EOS (kept).

    >>> cut_at_stop([5, 2, 7, 8], remaining=10, room=10, eos_ids={2})
    ([5, 2], True)
    >>> cut_at_stop([5, 6, 7], remaining=2, room=10, eos_ids=set())
    ([5, 6], False)
    """
    tokens = tokens[: min(remaining, room)]
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1], True
    return tokens, False


class Generation:
    """One request in the loop, one step at a time: `plan` (propose) before each target forward,
    `advance` (accept, commit, observe) after it. `decode` runs one generation to its end;
    engine/batch.py steps several side by side, their forwards together."""

    def __init__(self, target: Backend, prompt_ids: list[int], drafter: Drafter, max_new_tokens: int, eos_ids: set[int],
                 on_tokens: Callable[[list[int]], bool | None] | None = None, sampling: SamplingConfig | None = None, tokenizer=None):
        if not prompt_ids:
            raise PromptTooLongError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= target.max_length:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {target.max_length} tokens"
            )
        self.target, self.drafter, self.eos_ids, self.on_tokens = target, drafter, eos_ids, on_tokens
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.session = Session(target, prompt_ids, max_new_tokens, sampling, tokenizer)
        self.stop: str | None = None  # set when the generation is over
        self.step_rows = 0  # rows of the last step's forward (what it adds to a shared forward)
        self.step_tokens = 0  # tokens the last step emitted
        self._proposal: Proposal | None = None
        self._t_start = time.perf_counter()
        try:
            target.observe_tokens(prompt_ids)  # what the backend learns across requests (its reduced draft vocabulary)
            drafter.start(self.session)
        except BaseException:
            target.release(self.session.cache)
            raise
        self.stats.draft_time += time.perf_counter() - self._t_start

    def plan(self) -> ForwardRequest | None:
        """Step 1, propose: this step's forward, or None when the generation is over (length, context)."""
        s, target = self.session, self.target
        remaining = s.max_new_tokens - len(s.generated)
        if self.stop is None and remaining <= 0:
            self.stop = "length"
        elif self.stop is None and len(s.ids) >= target.max_length:
            self.stop = "context"
        if self.stop is not None:
            return None
        t0 = time.perf_counter()
        proposal = self.drafter.propose(s) if remaining > 1 else Proposal()  # nothing to verify for the last token
        self._dropped = remaining <= 1
        self._past = s.cache_len
        self._n_pending = len(s.pending)
        if self._past + Layout.of(self._n_pending, proposal.tree, proposal.aux).n_rows > target.max_length:
            proposal, self._dropped = Proposal(), True  # no room for drafts near the end of the context
        self._proposal = proposal
        self._t_planned = time.perf_counter()
        self.stats.draft_time += self._t_planned - t0
        return ForwardRequest(s.cache, s.pending, proposal.tree, proposal.aux, proposal.needs_hidden_states)

    def advance(self, out: VerifyOutput) -> None:
        """Steps 3 and 4, accept and commit, after the forward `plan` asked for (`out`)."""
        s, target, proposal = self.session, self.target, self._proposal
        remaining = s.max_new_tokens - len(s.generated)
        allowed = None if target.verifies_trees else set(proposal.tree.main_chain())  # a chains-only backend verified that path
        acceptance = accept(proposal.tree, out.logits, s.sampling, s.generator, proposal.draft_probs, s.noise, len(s.ids), allowed)
        target.commit(s.cache, self._past, out.layout.kept_rows(acceptance.path))
        t2 = time.perf_counter()
        emitted, eos = cut_at_stop(acceptance.tokens, remaining, target.max_length - len(s.ids), self.eos_ids)
        s.ids.extend(emitted)
        target.observe_tokens(emitted)
        s.pending = [acceptance.bonus]
        self.drafter.observe(s, StepResult(proposal, out, acceptance, emitted, self._dropped))
        t3 = time.perf_counter()

        stats = self.stats
        stats.target_forwards += 1
        stats.accept_lengths.append(len(emitted))
        stats.draft_sizes.append(len(proposal.tree))
        self.step_rows = out.layout.n_rows - (self._n_pending - 1)
        stats.step_rows.append(self.step_rows)
        self.step_tokens = len(emitted)
        stats.draft_time += t3 - t2
        stats.verify_time += t2 - self._t_planned  # a shared forward counts whole for each of its generations
        stopped = bool(self.on_tokens is not None and emitted and self.on_tokens(emitted))
        if eos:
            self.stop = "eos"
        elif stopped:
            self.stop = "stop"

    def finish(self) -> tuple[list[int], GenerationStats, str]:
        """The drafter's `finish` (after a stop), the cache released; (new ids, stats, stop reason)."""
        try:
            if self.stop is not None:
                t0 = time.perf_counter()
                self.drafter.finish(self.session)  # e.g. omnidraft's online distillation: its time counts in the request's wall time
                self.stats.adapt_time = time.perf_counter() - t0
        finally:
            self.close()
        self.stats.new_tokens = len(self.session.generated)
        self.stats.wall_time = time.perf_counter() - self._t_start
        return self.session.generated, self.stats, self.stop

    def close(self) -> None:
        """Free the cache (also when the generation ends in an error)."""
        self.target.release(self.session.cache)


@torch.inference_mode()
def decode(
    target: Backend,
    prompt_ids: list[int],
    drafter: Drafter,
    max_new_tokens: int,
    eos_ids: set[int],
    on_tokens: Callable[[list[int]], bool | None] | None = None,
    sampling: SamplingConfig | None = None,
    tokenizer=None,
) -> tuple[list[int], GenerationStats, str]:
    """Generate up to `max_new_tokens` after `prompt_ids`; returns (new ids, stats, stop reason).

    on_tokens(ids): called with each step's committed tokens; returning True ends the generation
    there (stop reason "stop"). sampling: temperature / top-k / top-p / seed (default: greedy).
    tokenizer: the target's, for drafters that read text (Session.tokenizer)."""
    gen = Generation(target, prompt_ids, drafter, max_new_tokens, eos_ids, on_tokens, sampling, tokenizer)
    try:
        while (request := gen.plan()) is not None:  # 1. propose
            out = target.forward(request.cache, request.pending, request.tree, request.aux, request.output_hidden_states)  # 2. verify
            gen.advance(out)  # 3. accept, 4. commit
            if gen.stop is not None:
                break
    except BaseException:
        gen.close()
        raise
    return gen.finish()
