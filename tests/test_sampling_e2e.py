"""Lossless sampling end to end: the tokens `decode` samples, method by method, against the target.

For two sampling settings, the first three generated tokens of SmolLM2 over SEEDS seeds form an
empirical joint distribution; the target's own joint distribution is computed exactly from its
logits (a plain transformers forward, transformers' own warpers: nothing of specprobe's sampling
code), and a chi-square test compares the two (p > 0.01), for plain decoding (`ar`) and for the
default method (`hybrid`, the production path). The prompt is one whose drafts are accepted
often, asserted per method, so the accepted and recovered paths of the rule are both exercised.
The path under test is the one `generate` runs: the decoding loop, the method's drafter, the
Gumbel-coupled acceptance with its per-position noise, the warping. Only the target's forwards
are replayed from a table once run (tests/replay_backend.py), which is what makes thousands of
generations affordable.

Every other method is held to more than its distribution: the acceptance rule is coupled (the
noise that picks a token is keyed by the token's position, not by the draft), so a lossless
method samples, seed by seed, the very tokens `ar` samples, and equal tokens on every seed give
the same empirical distribution as `ar`'s, which the chi-square test checks. Each method must
equal `ar` on EQUAL_SEEDS seeds (a deviation on one seed in a few hundred fails it, which a
chi-square test over thousands of seeds would not see); the hybrid on all SEEDS.

Negative controls: the same tests, with deliberately wrong variants of that path switched on
through `sampling.injected_fault`, must reject at p < 1e-6 and differ from `ar` on some seed;
otherwise the tests could not fail.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from replay_backend import ReplayBackend, ReplayMiss
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import specprobe
from specprobe.api import eos_token_ids
from specprobe.backends.torch import TorchBackend
from specprobe.drafters import make_drafter
from specprobe.engine.decode import decode
from specprobe.engine.sampling import FAULTS, SamplingConfig, injected_fault
from specprobe.models import format_prompt

SEEDS = 4000
EQUAL_SEEDS = 1000  # seeds on which each other method's tokens must equal ar's
NEW_TOKENS = 3
ALPHA = 0.01  # a correct path passes at p > ALPHA
REJECT = 1e-6  # a broken path fails at p < REJECT
MIN_EXPECTED = 5.0  # outcomes expected fewer times are pooled into one bin
# a raw prompt (no chat template) that repeats a list: the drafters' copies and ESP's guesses are
# accepted often, and the next tokens stay uncertain enough (hundreds of outcomes at T = 1) that a
# wrong noise key shows in the joint distribution
LIST = "apples, bananas, cherries, dates, figs, grapes, lemons, mangoes."
PROMPT = f"{LIST} {LIST} apples, bananas,"
SETTINGS = {"t1.0": SamplingConfig(temperature=1.0), "t0.7-p0.9-k50": SamplingConfig(temperature=0.7, top_p=0.9, top_k=50)}
TESTED_BY_CHI_SQUARE = ("ar", "hybrid")
EQUAL_TO_AR = ("esp", "pld", "token-recycling", "suffix")
# fixed tree sizes: `--budget auto` sizes trees from timed steps, which replayed forwards would
# distort (and every new size would be a forward to run); which tokens a tree holds does not
# change what the rule emits, only how many drafts it accepts
OPTIONS = {"esp": {"budget": 4}, "hybrid": {"budget": 6}, "token-recycling": {"budget": 6}, "suffix": {"budget": 6}}
# one worker per setting (a replay table each): the two halves of the file run side by side
GROUP = {name: pytest.mark.xdist_group(f"sampling-e2e-{name}") for name in SETTINGS}


class Target:
    """The target's exact joint distribution of the next NEW_TOKENS tokens after the prompt."""

    def __init__(self, lm, prompt_ids: list[int], cfg: SamplingConfig, eos: set[int]):
        self.model, self.prompt_ids, self.cfg, self.eos = lm.model, prompt_ids, cfg, eos
        self.dist: dict[tuple[int, ...], torch.Tensor] = {}  # prefix -> warped next-token probabilities [vocab]

    def _warp(self, logits: torch.Tensor) -> torch.Tensor:  # [rows, vocab] -> probabilities
        scores = TemperatureLogitsWarper(self.cfg.temperature)(None, logits.float())
        if self.cfg.top_k:
            scores = TopKLogitsWarper(self.cfg.top_k)(None, scores)
        if self.cfg.top_p < 1.0:
            scores = TopPLogitsWarper(self.cfg.top_p)(None, scores)
        return scores.softmax(dim=-1)

    @torch.inference_mode()
    def _compute(self, prefixes: list[tuple[int, ...]]) -> None:
        todo = [p for p in prefixes if p not in self.dist]
        for start in range(0, len(todo), 64):  # equal lengths: one batch, no padding
            batch = todo[start : start + 64]
            ids = torch.tensor([self.prompt_ids + list(p) for p in batch])
            logits = self.model(input_ids=ids).logits[:, -1]  # [batch, vocab]
            for p, probs in zip(batch, self._warp(logits)):
                self.dist[p] = probs

    def probability(self, outcome: tuple[int, ...]) -> float:
        self._compute([outcome[:i] for i in range(len(outcome))])
        prob = 1.0
        for i, token in enumerate(outcome):
            prob *= float(self.dist[outcome[:i]][token])
        return prob

    def likely_outcomes(self, threshold: float) -> dict[tuple[int, ...], float]:
        """Every outcome (NEW_TOKENS tokens, or fewer ending at EOS) of probability >= threshold."""
        frontier, done = {(): 1.0}, {}
        for _ in range(NEW_TOKENS):
            self._compute(list(frontier))
            grown = {}
            for prefix, prob in frontier.items():
                probs = self.dist[prefix]
                for token in torch.nonzero(probs * prob >= threshold).flatten().tolist():
                    outcome, p = prefix + (token,), prob * float(probs[token])
                    (done if token in self.eos else grown)[outcome] = p
            frontier = grown
        done.update(frontier)
        return done


def chi_square_p(counts: Counter, target: Target, n: int) -> float:
    """p-value of the observed outcome counts against the target's exact distribution: one bin per
    outcome expected >= MIN_EXPECTED times, every other outcome (seen or not) in one pooled bin."""
    expected = {o: n * p for o, p in target.likely_outcomes(MIN_EXPECTED / n).items()}
    observed = [counts.get(o, 0) for o in expected]
    exp = list(expected.values())
    rest_observed, rest_expected = n - sum(observed), n - sum(exp)
    if rest_expected >= 1e-9 * n:
        observed.append(rest_observed)
        exp.append(rest_expected)
    elif rest_observed:
        return 0.0  # outcomes the target gives no mass to
    assert len(exp) >= 10, f"only {len(exp)} bins: too few outcomes for the test to have power"
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    statistic = float(((o - e) ** 2 / e).sum())
    dof = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def setup(smollm2):
    prompt_ids = format_prompt(smollm2.tokenizer, PROMPT, chat=False)
    eos = eos_token_ids(smollm2.model, smollm2.tokenizer)
    replay = ReplayBackend(TorchBackend.of(smollm2.model), defer=True)
    replay.warm(prompt_ids, depth=NEW_TOKENS - 1, min_prob=0.2 / SEEDS)  # batched: most rows in a few forwards
    targets = {name: Target(smollm2, prompt_ids, cfg, eos) for name, cfg in SETTINGS.items()}
    return smollm2, prompt_ids, eos, replay, targets


def sample(setup, method: str, cfg: SamplingConfig, seeds=range(SEEDS)) -> tuple[dict[int, tuple[int, ...]], float]:
    """The tokens of each seed in `seeds`, and the fraction of generations that accepted a draft.
    The seeds run in rounds: a generation that needs a row not computed yet is put off to the next
    round, after the rows of all such generations are computed together (`ReplayBackend.run_deferred`)."""
    lm, prompt_ids, eos, replay, _ = setup
    outcomes, accepted, todo = {}, 0, list(seeds)
    while todo:
        put_off = []
        for seed in todo:
            drafter = make_drafter(method, **OPTIONS.get(method, {}))  # as `generate` makes one per request
            try:
                ids, stats, _ = decode(replay, prompt_ids, drafter, NEW_TOKENS, eos, sampling=replace(cfg, seed=seed), tokenizer=lm.tokenizer)
            except ReplayMiss:
                put_off.append(seed)
                continue
            outcomes[seed] = tuple(ids)
            accepted += stats.target_forwards < len(ids)
        replay.run_deferred()
        todo = put_off
    return outcomes, accepted / len(seeds)


@pytest.fixture(scope="module")
def ar_tokens(setup):
    """Plain decoding's tokens for every seed, by setting (a setting is run when first asked for)."""
    by_setting: dict[str, dict[int, tuple[int, ...]]] = {}

    def of(setting: str) -> dict[int, tuple[int, ...]]:
        if setting not in by_setting:
            by_setting[setting] = sample(setup, "ar", SETTINGS[setting])[0]
        return by_setting[setting]

    return of


def differing_seeds(outcomes: dict[int, tuple[int, ...]], ar: dict[int, tuple[int, ...]]) -> list[int]:
    return [seed for seed, ids in outcomes.items() if ids != ar[seed]]


def assert_same_tokens_as_ar(outcomes: dict[int, tuple[int, ...]], ar: dict[int, tuple[int, ...]], label: str) -> None:
    differ = differing_seeds(outcomes, ar)
    assert not differ, f"{label}: tokens differ from ar's on {len(differ)} of {len(outcomes)} seeds (first: seed {differ[0]})"


@pytest.mark.parametrize("setting", [pytest.param(name, marks=GROUP[name]) for name in SETTINGS])
@pytest.mark.parametrize("method", TESTED_BY_CHI_SQUARE)
def test_sampled_tokens_follow_the_target(setup, ar_tokens, method, setting):
    ar = ar_tokens(setting)
    outcomes, accepted = (ar, 0.0) if method == "ar" else sample(setup, method, SETTINGS[setting])
    if method != "ar":
        assert accepted > 0.3, f"{method}: drafts accepted in {accepted:.0%} of generations; the test would not exercise acceptance"
        assert_same_tokens_as_ar(outcomes, ar, f"{method} at {setting}")
    counts = Counter(outcomes.values())
    p = chi_square_p(counts, setup[4][setting], SEEDS)
    print(f"{method} at {setting}: p = {p:.3g}, {len(counts)} distinct outcomes, drafts accepted in {accepted:.0%} of generations")
    assert p > ALPHA, f"{method} at {setting}: p = {p:.2e}, {len(counts)} distinct outcomes"


@pytest.mark.parametrize("setting", [pytest.param(name, marks=GROUP[name]) for name in SETTINGS])
@pytest.mark.parametrize("method", EQUAL_TO_AR)
def test_sampled_tokens_equal_plain_decodings_seed_by_seed(setup, ar_tokens, method, setting):
    ar = ar_tokens(setting)
    outcomes, accepted = sample(setup, method, SETTINGS[setting], seeds=range(EQUAL_SEEDS))
    assert accepted > 0.3, f"{method}: drafts accepted in {accepted:.0%} of generations; the test would not exercise acceptance"
    assert_same_tokens_as_ar(outcomes, ar, f"{method} at {setting}")


# the faults under pld, whose steps are short (noise keyed by depth within a step repeats across
# steps only where a step does not emit all three tokens at once, as the hybrid's mostly do here);
# reused-noise under the hybrid, which accepts drafts whatever the noise
FAULT_RUNS = [("noise-by-row", "pld", "t1.0"), ("warp-order", "pld", "t0.7-p0.9-k50"), ("cuts-after-noise", "pld", "t0.7-p0.9-k50"), ("reused-noise", "hybrid", "t0.7-p0.9-k50")]


@pytest.mark.parametrize("fault, method, setting", [pytest.param(*run, marks=GROUP[run[2]]) for run in FAULT_RUNS])
def test_a_broken_sampling_path_fails_the_same_tests(setup, ar_tokens, fault, method, setting):
    assert fault in FAULTS
    ar = ar_tokens(setting)
    with injected_fault(fault):
        outcomes, accepted = sample(setup, method, SETTINGS[setting])
    assert accepted > 0.3, f"{method}: drafts accepted in {accepted:.0%} of generations"
    p = chi_square_p(Counter(outcomes.values()), setup[4][setting], SEEDS)
    differ = differing_seeds({seed: outcomes[seed] for seed in range(EQUAL_SEEDS)}, ar)
    print(f"fault {fault} ({method}, {setting}): p = {p:.3g}, tokens differ from ar's on {len(differ)} of the first {EQUAL_SEEDS} seeds")
    assert p < REJECT, f"{fault}: p = {p:.2e}: the chi-square test cannot tell this broken path from a correct one"
    assert differ, f"{fault}: the seed-by-seed test cannot tell this broken path from a correct one"


@GROUP["t0.7-p0.9-k50"]
def test_generate_is_the_path_under_test(setup):
    """`generate` (real backend, no replay) gives the same tokens as the replayed `decode` above."""
    lm, prompt_ids, eos, replay, _ = setup
    for seed in (0, 1, 2):
        cfg = replace(SETTINGS["t0.7-p0.9-k50"], seed=seed)
        out = specprobe.generate(lm.model, lm.tokenizer, prompt_ids, method="hybrid", max_new_tokens=NEW_TOKENS, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=seed)
        while True:
            try:
                ids, _, _ = decode(replay, prompt_ids, make_drafter("hybrid", **OPTIONS["hybrid"]), NEW_TOKENS, eos, sampling=cfg, tokenizer=lm.tokenizer)
                break
            except ReplayMiss:
                replay.run_deferred()
        assert out.token_ids == ids


@GROUP["t0.7-p0.9-k50"]
def test_seeds_reproduce_and_differ(setup):
    """One seed, one text: across methods and across runs; two seeds give two texts."""
    lm = setup[0]
    prompt_ids = setup[1]
    run = lambda method, seed: specprobe.generate(lm.model, lm.tokenizer, prompt_ids, method=method, max_new_tokens=24, temperature=1.0, seed=seed).token_ids
    first = run("ar", 11)
    assert all(run(m, 11) == first for m in ("esp", "pld", "hybrid", "token-recycling", "suffix")) and run("ar", 11) == first
    assert run("hybrid", 12) != first
