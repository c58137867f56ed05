"""The decoding loop: propose -> verify (one target forward over a tree) -> accept -> commit.

The loop is the same for every method; a method is a drafter (see drafters/base.py). Plain
decoding (`ar`) is the drafter that proposes nothing, so every speed ratio specprobe reports
compares two runs of this one loop.

Counting: every target forward is one step, the first one included (it processes the prompt and
emits the first token, like the prefill of `model.generate`). tau = new tokens / target forwards,
so plain decoding has tau = 1 exactly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .drafters.base import Drafter, Proposal, StepResult
from .errors import PromptTooLongError
from .kv_cache import cache_length, keep_rows, new_cache
from .sampling import PositionNoise, SamplingConfig, accept
from .tree import Layout
from .verify import Target


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
    stop_reason: str  # "eos", "length" or "context"
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
    """What a drafter may read during one generation."""

    def __init__(self, target: Target, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig | None = None):
        self.target = target
        self.sampling = sampling or SamplingConfig()  # temperature 0: greedy
        self.generator = None if self.sampling.greedy else self.sampling.generator()
        self.noise = None if self.sampling.greedy else PositionNoise(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
        self.prompt_len = len(prompt_ids)
        self.ids: list[int] = list(prompt_ids)  # committed tokens: prompt + generated
        self.pending: list[int] = list(prompt_ids)  # committed but not yet in the cache
        self.cache = new_cache()
        self.max_new_tokens = max_new_tokens

    @property
    def generated(self) -> list[int]:
        return self.ids[self.prompt_len :]

    @property
    def cache_len(self) -> int:
        return cache_length(self.cache)


@torch.inference_mode()
def decode(
    target: Target,
    prompt_ids: list[int],
    drafter: Drafter,
    max_new_tokens: int,
    eos_ids: set[int],
    on_tokens: Callable[[list[int]], None] | None = None,
    sampling: SamplingConfig | None = None,
) -> tuple[list[int], GenerationStats, str]:
    """Generate up to `max_new_tokens` after `prompt_ids`; returns (new ids, stats, stop reason).
    `sampling`: temperature / top-k / top-p / seed (default: greedy)."""
    if not prompt_ids:
        raise PromptTooLongError("the prompt is empty: give at least one token")
    if len(prompt_ids) >= target.max_length:
        raise PromptTooLongError(
            f"the prompt has {len(prompt_ids)} tokens; the model's context is {target.max_length} tokens"
        )
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    session = Session(target, prompt_ids, max_new_tokens, sampling)
    target.observe_tokens(prompt_ids)  # the reduced draft vocabulary learns from what it serves
    t_start = time.perf_counter()
    drafter.start(session)
    stats.draft_time += time.perf_counter() - t_start
    stop = "length"
    while True:
        remaining = max_new_tokens - len(session.generated)
        if remaining <= 0:
            stop = "length"
            break
        if len(session.ids) >= target.max_length:
            stop = "context"
            break
        t0 = time.perf_counter()
        proposal = drafter.propose(session) if remaining > 1 else Proposal()
        t1 = time.perf_counter()
        past = session.cache_len
        n_pending = len(session.pending)
        if past + Layout.of(n_pending, proposal.tree, proposal.aux).n_rows > target.max_length:
            proposal = Proposal()  # no room for drafts near the end of the context
        out = target.forward(session.cache, session.pending, proposal.tree, proposal.aux, proposal.needs_hidden_states)
        acceptance = accept(proposal.tree, out.logits, session.sampling, session.generator, proposal.draft_probs, session.noise, len(session.ids))
        keep_rows(session.cache, past, list(range(n_pending)) + [n_pending + i for i in acceptance.path])
        t2 = time.perf_counter()

        emitted = acceptance.tokens[:remaining]
        room = target.max_length - len(session.ids)
        emitted = emitted[:room]
        for i, tok in enumerate(emitted):
            if tok in eos_ids:
                emitted = emitted[: i + 1]
                stop = "eos"
                break
        session.ids.extend(emitted)
        target.observe_tokens(emitted)
        session.pending = [acceptance.bonus]
        step = StepResult(proposal, out, acceptance, emitted)
        drafter.observe(session, step)
        t3 = time.perf_counter()

        stats.target_forwards += 1
        stats.accept_lengths.append(len(emitted))
        stats.draft_sizes.append(len(proposal.tree))
        stats.step_rows.append(out.layout.n_rows - (n_pending - 1))
        stats.draft_time += (t1 - t0) + (t3 - t2)
        stats.verify_time += t2 - t1
        if on_tokens is not None and emitted:
            on_tokens(emitted)
        if stop == "eos":
            break
    stats.new_tokens = len(session.generated)
    stats.wall_time = time.perf_counter() - t_start
    return session.generated, stats, stop
