"""specprobe's training-free drafters inside vLLM, through vLLM's `custom_class` proposer plug-in.

    from vllm import LLM
    llm = LLM(model=..., speculative_config={
        "method": "custom_class",
        "model": "specprobe.integrations.vllm.HybridProposer",
        "num_speculative_tokens": 8,
    })

vLLM builds the class from its `VllmConfig` in its engine process and, after every engine step,
calls `propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)`: per row of its persistent
batch, the tokens that step emitted and the row's whole text. It wants one draft chain per row
(vLLM verifies chains, at most `num_speculative_tokens` long; an empty list drafts nothing) and
never says which request a row holds. Each step, per row, a proposer here:

    1. find    the row's request (`RequestState`): the one it held last step if the text still
               fits, else any that fits (rows move as requests come and go), else a new one
    2. learn   last step's candidates, drafted or not, scored against the tokens vLLM emitted
               (they are the target's own continuation, so every candidate is tested, not only
               the drafted ones), token by token up to the first miss; and last step's best chain
               the same way, which calibrates the chain's scores (`ChainCalibration`)
    3. draft   the candidates of its sources (pld: prompt lookup; pool: the n-gram pool; suffix:
               suffix tries over this text and over earlier requests' outputs), each token scored
               by the acceptance measured so far, merged into one trie (hybrid.py's
               `merge_scored`), whose best path is the chain, scored on the calibration
    4. size    across the whole batch, the draft tokens that raise the expected tokens per second
               on the step-cost line fitted online (`StepCosts`, `size_chains`): with one request
               a step is mostly fixed cost and drafts are cheap; as the batch fills the machine
               each token costs more of the step and the chains shrink to nothing
Rows whose request is gone finish it: its output joins the suffix source's global trie and its
state is freed.

Not offered: Token Recycling learns from the target's logits, which the plug-in does not see; ESP
rides mask rows inside the verification forward, which needs vLLM's model runner (docs/vllm.md).
This module imports nothing of vLLM: it is tested against that interface without vLLM installed.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..drafters.hybrid import COPY_NGRAM, COPY_RUN, MIN_SCORE, ScoredPath, SourceRates, merge_scored
from ..drafters.ngram import NGramPool, ends_in_repeat, find_continuations
from ..drafters.suffix import GlobalOutputs, SuffixConfig, SuffixSource
from ..engine.budget import Calibration, ChainCalibration
from ..engine.tree import ROOT

POOL_N = 4  # the pool's n-grams: a token and the 3 that followed it (the hybrid's default)
POOL_PER_KEY = 3
PLD_CANDIDATES = 4
SUFFIX_NODES = 16
# the step-cost line before any step is timed: each scheduled token adds this fraction of a
# one-token step (vLLM's CPU runner, SmolLM2-135M, 2 cores: README, "vLLM")
PRIOR_TOKEN_COST = 0.04
MAX_STEP_SECONDS = 5.0  # a longer gap between two calls was the engine idling, not a step
MIN_STEPS_TO_FIT = 24  # timed steps (with at least two different token counts) before the fit replaces the prior
OUTPUT_TOKENS_KEPT = 1024  # of a finished output, for the global trie: its 200 outputs then hold at most ~5M nodes
PARKED_CALLS = 16  # a request unseen for this many calls has finished (vLLM drops paused requests from its batch too)


@dataclass
class Candidate:
    """One source's continuation of a request's text, as last drafted."""

    label: str  # "pld#0" (rank 0), "pool#1@copy" (copy mode), "suffix"
    tokens: list[int]
    conditional: list[float] | None = None  # the source's own probability of each token (suffix), else None


class RequestState:
    """What the proposer keeps of one request: its text and the sources' structures over it."""

    def __init__(self, tokens: list[int], prompt_length: int, sources: tuple[str, ...], outputs: GlobalOutputs | None):
        self.tokens = tokens
        self.prompt_length = prompt_length
        self.pool = NGramPool(POOL_N, POOL_PER_KEY, 1 << 16) if "pool" in sources else None
        if self.pool is not None:
            self.pool.add_text(tokens)
        self.suffix = SuffixSource(SuffixConfig(), tokens, outputs) if "suffix" in sources else None
        self.candidates: list[Candidate] = []
        self.drafted = 0  # tokens drafted for it last step
        self.chain: list[int] = []  # last step's best chain, drafted or not
        self.chain_conditionals: list[float] = []  # ... each token's raw conditional estimate
        self.copy_mode = ends_in_repeat(tokens, COPY_NGRAM)
        self.parked_at: int | None = None  # the call it went unclaimed at (finished, or only paused)

    def fits(self, row: np.ndarray, n: int, emitted: int) -> bool:
        """Whether row[:n] is this request's text followed by the `emitted` tokens of one step
        (at most one more than were drafted for it): a new request whose prompt starts with this
        one's text (the next turn of a chat) does not fit."""
        f = len(self.tokens)
        return f + emitted == n and emitted <= self.drafted + 1 and row[:f].tolist() == self.tokens

    def extend(self, new: list[int]) -> None:
        start = max(0, len(self.tokens) - POOL_N + 1)  # the first n-gram the new tokens complete
        self.tokens.extend(new)
        if self.pool is not None:
            self.pool.add_text(self.tokens, start)
        if self.suffix is not None:
            self.suffix.advance(self.tokens)

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_length :]


class StepCosts:
    """Seconds per engine step as a line a + b x (tokens scheduled), fitted to the last `window`
    steps timed; until they vary enough, b = PRIOR_TOKEN_COST x a.

    >>> costs = StepCosts()
    >>> for n, t in [(1, 0.050), (5, 0.070)] * 12:
    ...     costs.observe(n, t)
    >>> [round(x, 3) for x in costs.line()]
    [0.045, 0.005]
    """

    def __init__(self, prior_token_cost: float = PRIOR_TOKEN_COST, window: int = 256):
        self.prior = prior_token_cost
        self.steps: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, tokens: int, seconds: float) -> None:
        self.steps.append((tokens, seconds))

    def line(self) -> tuple[float, float]:
        """(a, b): seconds of a step's fixed part and of each token scheduled."""
        if not self.steps:
            return 1.0, self.prior
        n = np.array([s[0] for s in self.steps], dtype=float)
        t = np.array([s[1] for s in self.steps], dtype=float)
        if len(self.steps) >= MIN_STEPS_TO_FIT and n.var() > 0:
            b = float(((n - n.mean()) * (t - t.mean())).mean() / n.var())
            a = float(t.mean() - b * n.mean())
            if b >= 0 and a > 0:
                return a, b
        a = float(t.mean() / (1 + self.prior * n.mean()))
        return a, self.prior * a


def size_chains(chains: list[list[float]], a: float, b: float, limit: int) -> list[int]:
    """How many tokens of each row's chain to draft so that expected tokens per second is highest.

    A step of a batch of B rows costs a + b x (B + drafted tokens) seconds and emits, in
    expectation, B + the sum of the drafted tokens' scores (a score is the estimated chance that
    the target accepts the token with all before it). Tokens are taken best score first while one
    more raises (emitted / seconds), i.e. while score > b x emitted / seconds; a chain's scores
    never rise along it, so every row gets a prefix of its chain.

    One row, a step mostly fixed cost: three tokens pay, the fourth (0.05) does not:

    >>> size_chains([[0.9, 0.6, 0.3, 0.05]], a=1.0, b=0.1, limit=8)
    [3]

    Sixteen rows on the same line: a token must earn more than b x emitted / seconds, 0.62 at
    first and 0.72 once the sixteen 0.9s are in, so only the 0.9s pay:

    >>> size_chains([[0.9, 0.6, 0.3]] * 16, a=1.0, b=0.1, limit=8)[:2]
    [1, 1]
    """
    rows = len(chains)
    emitted, seconds = float(rows), a + b * rows
    order = sorted(((s, depth, i) for i, scores in enumerate(chains) for depth, s in enumerate(scores[:limit], start=1)), key=lambda x: (-x[0], x[1]))
    lengths = [0] * rows
    for score, depth, i in order:
        if score * seconds <= b * emitted:
            break
        if depth != lengths[i] + 1:  # its parent was not taken
            continue
        lengths[i] = depth
        emitted += score
        seconds += b
    return lengths


class SpecprobeProposer:
    """The vLLM `custom_class` proposer over specprobe's copy sources (`sources`); subclasses pick them."""

    sources: tuple[str, ...] = ("pld", "pool", "suffix")

    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.k = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        budget = os.environ.get("SPECPROBE_VLLM_BUDGET", "auto")  # "auto", or draft the best chain up to k always ("full")
        if budget not in ("auto", "full"):
            raise ValueError(f"SPECPROBE_VLLM_BUDGET must be 'auto' or 'full', got {budget!r}")
        self.auto = budget == "auto"
        self.rates = SourceRates()
        self.suffix_calibration = Calibration()
        self.chain_calibration = ChainCalibration()
        self.outputs = GlobalOutputs(SuffixConfig().max_tree_depth, SuffixConfig().max_cached_requests) if "suffix" in self.sources else None
        self.by_row: dict[int, RequestState] = {}
        self.parked: dict[int, RequestState] = {}  # id -> a request not in the last call's rows
        self.costs = StepCosts()
        self.clock = time.perf_counter  # what steps are timed with (tests give a clock of their own)
        self.last_call: float | None = None
        self.scheduled: int | None = None  # tokens the step after the last call verifies (None: not timed)
        self.steps = 0

    def load_model(self, *args, **kwargs) -> None:  # the plug-in's optional hook: no model to load
        return None

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        now = self.clock()
        step_seconds = now - self.last_call if self.last_call is not None else None
        self.last_call = now
        token_ids = token_ids_cpu.numpy() if hasattr(token_ids_cpu, "numpy") else np.asarray(token_ids_cpu)
        claimed: dict[int, RequestState] = {}
        taken: set[int] = set()
        chains: list[list[int]] = []
        scores: list[list[float]] = []
        live = [i for i, sampled in enumerate(sampled_token_ids) if sampled and int(num_tokens_no_spec[i]) < self.max_model_len]
        changed = any(not sampled for sampled in sampled_token_ids)  # a row still prefilling shares the step
        same_row = {}  # first pass: every row whose request is where it was last call
        for i in live:
            state = self.by_row.get(i)
            if state is not None and state.fits(token_ids[i], int(num_tokens_no_spec[i]), len(sampled_token_ids[i])):
                same_row[i] = state
                taken.add(id(state))
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            if i not in live:
                chains.append([])
                scores.append([])
                continue
            row = token_ids[i]
            state = same_row.get(i) or self._find(row, n, len(sampled), taken)
            if state is None:
                state = RequestState(row[:n].tolist(), n - len(sampled), self.sources, self.outputs)
                changed = True
            else:
                new = row[len(state.tokens) : n].tolist()
                longest = self._learn(state, new)
                state.extend(new)
                state.copy_mode = longest >= COPY_RUN or ends_in_repeat(state.tokens, COPY_NGRAM)
                changed |= state.parked_at is not None  # back from a pause
                state.parked_at = None
                self.parked.pop(id(state), None)
            taken.add(id(state))
            claimed[i] = state
            chain, chain_scores = self._draft(state, min(self.k, self.max_model_len - n - 1))
            chains.append(chain)
            scores.append(chain_scores)
        for state in self.by_row.values():
            if id(state) not in taken:  # finished, or paused: parked until it has been gone long enough
                state.parked_at = self.steps
                self.parked[id(state)] = state
                changed = True
        for key, state in list(self.parked.items()):
            if self.steps - state.parked_at >= PARKED_CALLS:  # finished: its output joins the global trie
                if self.outputs is not None:
                    self.outputs.add(state.output[:OUTPUT_TOKENS_KEPT])
                del self.parked[key]
        self.by_row = claimed
        if self.scheduled is not None and not changed and step_seconds is not None and step_seconds < MAX_STEP_SECONDS:
            self.costs.observe(self.scheduled, step_seconds)  # a step with no request joining, leaving or idle between
        if self.auto:
            a, b = self.costs.line()
            lengths = size_chains(scores, a, b, self.k)
        else:
            lengths = [len(c) for c in chains]
        drafts = [chain[:length] for chain, length in zip(chains, lengths)]
        for i, state in claimed.items():
            state.drafted = lengths[i]
        self.scheduled = None if changed else sum(1 + len(d) for i, d in enumerate(drafts) if i in claimed)
        self.steps += 1
        return drafts

    # -- the four steps' parts ---------------------------------------------------------------
    def _find(self, row: np.ndarray, n: int, emitted: int, taken: set[int]) -> RequestState | None:
        """A request of another row last call, or a parked one, whose text `row` continues."""
        for state in [*self.by_row.values(), *self.parked.values()]:
            if id(state) not in taken and state.fits(row, n, emitted):
                return state
        return None

    def _learn(self, state: RequestState, new: list[int]) -> int:
        """Score last step's candidates against `new`, the tokens the target emitted after them;
        returns the most tokens of `new` any candidate had right."""
        longest = 0
        seen: set[tuple[int, ...]] = set()  # suffix candidates are a tree's paths: a shared node counts once
        for cand in state.candidates:
            for j, token in enumerate(cand.tokens[: len(new)]):
                hit = token == new[j]
                if cand.conditional is None:
                    self.rates.update(cand.label, j + 1, hit)
                elif tuple(cand.tokens[: j + 1]) not in seen:
                    seen.add(tuple(cand.tokens[: j + 1]))
                    self.suffix_calibration.update(cand.conditional[j], hit)
                if not hit:
                    break
                longest = max(longest, j + 1)
        self.chain_calibration.learn(state.chain, state.chain_conditionals, new)
        return longest

    def _draft(self, state: RequestState, limit: int) -> tuple[list[int], list[float]]:
        """The best chain over the sources' candidates (at most `limit` tokens) and each token's score."""
        if limit <= 0:
            state.candidates = []
            return [], []
        ids, cands = state.tokens, []
        mode = "@copy" if state.copy_mode else ""
        if "pld" in self.sources:
            for rank, seq in enumerate(find_continuations(ids, 3, 1, limit, PLD_CANDIDATES)):
                cands.append(Candidate(f"pld#{min(rank, 2)}{mode}", seq))
        if state.pool is not None:
            for rank, gram in enumerate(state.pool.lookup(ids[-1])):
                cands.append(Candidate(f"pool#{min(rank, 2)}{mode}", list(gram[:limit])))
        if state.suffix is not None:
            tree, probs = state.suffix.candidates(ids, SUFFIX_NODES)
            has_child = {p for p in tree.parents if p != ROOT}
            for leaf in (i for i in range(len(tree)) if i not in has_child):
                nodes = tree.path_to(leaf)[:limit]
                conds = [probs[i] / (probs[tree.parents[i]] if tree.parents[i] != ROOT else 1.0) for i in nodes]
                cands.append(Candidate("suffix", [tree.tokens[i] for i in nodes], conds))
        state.candidates = cands
        paths = []
        for cand in cands:
            score, path_scores = 1.0, []
            for d in range(1, len(cand.tokens) + 1):
                if cand.conditional is None:
                    score *= self.rates.rate(cand.label, d)
                else:
                    score *= min(1.0, cand.conditional[d - 1] * self.suffix_calibration.factor)
                if score < MIN_SCORE:
                    break
                path_scores.append(score)
            if path_scores:
                paths.append(ScoredPath(cand.label, cand.tokens[: len(path_scores)], path_scores))
        state.chain, state.chain_conditionals = [], []
        if not paths:
            return [], []
        tree, node_scores, _ = merge_scored(paths)
        chain = tree.main_chain()[:limit]
        raw = [node_scores[i] / (node_scores[tree.parents[i]] if tree.parents[i] != ROOT else 1.0) for i in chain]
        state.chain, state.chain_conditionals = [tree.tokens[i] for i in chain], raw
        return state.chain, self.chain_calibration.path_scores(raw)

class HybridProposer(SpecprobeProposer):
    """pld, the n-gram pool and the suffix tries, scored and merged (the hybrid's copy sources)."""

    sources = ("pld", "pool", "suffix")


class PromptLookupProposer(SpecprobeProposer):
    """Prompt lookup alone (find_continuations), sized by the same budget."""

    sources = ("pld",)


class NGramPoolProposer(SpecprobeProposer):
    """The n-gram pool alone: n-grams of the text that followed its last token before."""

    sources = ("pool",)


class SuffixProposer(SpecprobeProposer):
    """The suffix tries alone (SuffixDecoding's sources, over this text and earlier outputs)."""

    sources = ("suffix",)


PROPOSERS = {"hybrid": HybridProposer, "pld": PromptLookupProposer, "pool": NGramPoolProposer, "suffix": SuffixProposer}


def speculative_config(method: str = "hybrid", num_speculative_tokens: int = 8) -> dict:
    """The `speculative_config` that runs proposer `method` inside vLLM's `LLM(...)`."""
    if method not in PROPOSERS:
        raise ValueError(f"unknown vLLM proposer {method!r}; choose from {', '.join(PROPOSERS)}")
    return {"method": "custom_class", "model": f"{__name__}.{PROPOSERS[method].__name__}", "num_speculative_tokens": num_speculative_tokens}
