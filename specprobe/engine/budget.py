"""The hardware-aware tree budget (`--budget auto`): the tree size that maximises tokens per second.

A drafter ranks its candidate nodes best first, each with an estimate of the probability that the
target accepts it (the product of its path's conditional acceptance estimates, so a node never
scores above its parent and the first n nodes always form a tree). A tree of the first n nodes
then emits on average 1 + s_1 + ... + s_n tokens per forward, and that forward costs T(q(n)),
where q(n) counts every row the forward runs (pending token, n nodes, the drafter's auxiliary
rows) and T is the target's measured cost curve on this machine (`Backend.cost_curve`). The
budget is the n that maximises (1 + s_1 + ... + s_n) / T(q(n)), chosen again at every step.

Drafters' raw scores are not calibrated (ESP's untrained masks are over-confident on SmolLM2,
under-confident on Gemma3): `Calibration` rescales them by the ratio of accepted to predicted
nodes seen so far in this generation.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import InvalidOptionError


@dataclass
class CostCurve:
    """T(q) from measured points, linearly interpolated (and extrapolated past the last point)."""

    qs: list[int]
    seconds: list[float]

    @classmethod
    def from_dict(cls, times: dict[int, float]) -> "CostCurve":
        """Measured points, made non-decreasing: q rows never cost more than the time measured for
        more rows (a forward could pad them), so a point above a later one is noise and is lowered
        (read raw, such a bump makes every tree near it look dearer than it is).

        >>> CostCurve.from_dict({1: 1.0, 8: 1.12, 16: 1.31, 32: 1.24}).seconds
        [1.0, 1.12, 1.24, 1.24]
        """
        qs = sorted(times)
        seconds = [times[q] for q in qs]
        for i in range(len(seconds) - 2, -1, -1):
            seconds[i] = min(seconds[i], seconds[i + 1])
        return cls(qs, seconds)

    def __call__(self, q: int) -> float:
        qs, ts = self.qs, self.seconds
        if q <= qs[0]:
            return ts[0]
        i = bisect.bisect_left(qs, q)
        if i == len(qs):  # beyond the last point: continue the last segment's slope
            i = len(qs) - 1
        q0, q1, t0, t1 = qs[i - 1], qs[i], ts[i - 1], ts[i]
        return t0 + (t1 - t0) * (q - q0) / (q1 - q0)


def best_size(scores: list[float], rows: Callable[[int], int], cost: Callable[[int], float], beside: float = 0.0) -> int:
    """The n in 0..len(scores) maximising (1 + beside + sum(scores[:n])) / cost(rows(n)), where
    `beside` is what other generations sharing the forward emit (0 alone; see engine/batch.py).

    Example: a flat cost up to 4 rows, then doubling; with one pending row and no auxiliary rows:
    >>> cost = CostCurve([1, 4, 8], [1.0, 1.0, 2.0])
    >>> best_size([0.9, 0.5, 0.3, 0.2, 0.1], rows=lambda n: 1 + n, cost=cost)
    3
    >>> best_size([0.9, 0.5, 0.3, 0.2, 0.1], rows=lambda n: 13 + n, cost=cost, beside=12.0)  # 12 others, 1 row each
    0
    """
    best_n, best_rate, expected = 0, (1.0 + beside) / cost(rows(0)), 1.0 + beside
    for n, s in enumerate(scores, start=1):
        expected += s
        rate = expected / cost(rows(n))
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


def best_plan(scores: list[float], plans: dict[str, tuple[Callable[[int], int], float]], cost: Callable[[int], float], beside: float = 0.0) -> tuple[str, int]:
    """The plan and n maximising (1 + sum(scores[:n]) + bonus) / cost(rows(n)) over every plan
    {name: (rows, bonus)}: ways of running the same best-first nodes with other auxiliary rows,
    a bonus being what a plan's extra rows are expected to add (in tokens) beyond this step's nodes.

    Example: mask rows make every forward one row dearer and are worth 0.3 tokens next step;
    where a second row costs 1.8x the first (a steep CPU curve), drafting nothing wins:
    >>> steep = CostCurve([1, 2, 3], [1.0, 1.8, 2.4])
    >>> best_plan([0.2], {"masks": (lambda n: 2 + n, 0.3), "bare": (lambda n: 1 + n, 0.0)}, steep)
    ('bare', 0)
    >>> flat = CostCurve([1, 3], [1.0, 1.05])
    >>> best_plan([0.2], {"masks": (lambda n: 2 + n, 0.3), "bare": (lambda n: 1 + n, 0.0)}, flat)
    ('masks', 1)
    """
    best = ("", 0, -1.0)
    for name, (rows, bonus) in plans.items():
        expected = 1.0 + beside + bonus
        candidates = [(0, expected / cost(rows(0)))]
        for n, s in enumerate(scores, start=1):
            expected += s
            candidates.append((n, expected / cost(rows(n))))
        n, rate = max(candidates, key=lambda c: c[1])
        if rate > best[2]:
            best = (name, n, rate)
    return best[0], best[1]


class Calibration:
    """accepted / predicted over the nodes the target has tested, starting from `prior`."""

    def __init__(self, prior: float = 1.0, weight: float = 4.0):
        self.accepted = prior * weight
        self.predicted = weight

    @property
    def factor(self) -> float:
        return self.accepted / self.predicted

    def update(self, predicted: float, accepted: int) -> None:
        self.predicted += predicted
        self.accepted += accepted


class ChainCalibration:
    """Measured acceptance of a chain token by its estimated conditional probability (ten bins,
    each starting at its own midpoint): a chain is the best of several sources' candidates, so
    its raw estimates run high where they are highest (the winner's curse). Each step the whole
    best chain of the step before, drafted or not, is scored against the tokens the target
    emitted (the hybrid on a chains-only backend, the vLLM proposer).

    >>> cal = ChainCalibration()
    >>> round(cal.rate(0.85), 2)
    0.85
    >>> for _ in range(40):
    ...     cal.update(0.85, False)
    >>> round(cal.rate(0.85), 2)
    0.04
    """

    BINS = 10

    def __init__(self, weight: float = 2.0):
        self.accepted = [(b + 0.5) / self.BINS * weight for b in range(self.BINS)]
        self.tested = [weight] * self.BINS

    def _bin(self, p: float) -> int:
        return min(self.BINS - 1, max(0, int(p * self.BINS)))

    def rate(self, p: float) -> float:
        b = self._bin(p)
        return self.accepted[b] / self.tested[b]

    def update(self, p: float, accepted: bool) -> None:
        b = self._bin(p)
        self.accepted[b] += accepted
        self.tested[b] += 1

    def path_scores(self, conditionals: list[float]) -> list[float]:
        """A chain's path scores on measured acceptance: the running product of `rate`."""
        scores, score = [], 1.0
        for p in conditionals:
            score *= self.rate(p)
            scores.append(score)
        return scores

    def learn(self, chain: list[int], conditionals: list[float], emitted: list[int]) -> None:
        """Score a chain (its tokens and raw conditionals) against the tokens the target emitted
        after the same text, up to the first miss (past it the chain says nothing)."""
        for token, p, chosen in zip(chain, conditionals, emitted):
            self.update(p, token == chosen)
            if token != chosen:
                break


def nodes_tested(parents: list[int], path: list[int]) -> list[int]:
    """Nodes whose parent (or the root) was accepted: the ones the verdict says something about.

    >>> nodes_tested([-1, 0, 0, -1, 1], path=[0, 1])
    [0, 1, 2, 3, 4]
    >>> nodes_tested([-1, 0, 1], path=[])
    [0]
    """
    ok = {-1, *path}
    return [i for i, p in enumerate(parents) if p in ok]


def parse_budget(value) -> int | str:
    """'auto' or a positive integer (as given to --budget or a drafter config)."""
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n):
        raise InvalidOptionError(f"budget must be 'auto' or an integer >= 1, got {value!r}")
    return n


class StepCosts:
    """Seconds per engine step of q rows: the measured cost curve, corrected by the steps this
    process has timed.

    The curve is measured once, over one context length, in a pattern unlike decoding's (q values
    interleaved), and maybe while the machine was busy; a step also pays for drafting and
    acceptance. So each timed step of q rows updates a running ratio observed / curve(q), and
    T(q) is curve(q) times the ratio of the nearest q timed so far (on a log scale), or the curve
    alone before any step was timed. Kept with the target's model across requests
    (`Backend.drafter_state`), one per drafter kind, whose per-step costs differ.

    A ratio is only re-timed when a step of its size runs, and the sizes run are chosen from the
    ratios: one slow step of 2 rows (a pause of the machine) would make 2 rows look too dear to
    ever run again, and the drafter would stop drafting for the rest of the process (seen: a
    65-question bench in which the hybrid on llama.cpp drafted nothing). So a ratio not timed for
    `STALE` steps drifts toward the ratio of the steps that are being timed.

    >>> costs = StepCosts(CostCurve([1, 2, 4], [1.0, 1.5, 2.0]))
    >>> costs(2)
    1.5
    >>> for _ in range(20):
    ...     costs.observe(1, 0.8)
    ...     costs.observe(2, 1.6)
    >>> round(costs(1), 2), round(costs(2), 2), round(costs(4), 2)   # 4 rows: scaled as 2 rows were
    (0.8, 1.6, 2.13)
    >>> costs.observe(2, 4.0)  # a pause during a 2-row step: 2 rows now look dearer than they are
    >>> round(costs(2), 2)
    2.08
    >>> for _ in range(100):  # only 1-row steps run after it
    ...     costs.observe(1, 0.8)
    >>> round(costs(2), 2)    # back to the curve's shape at the 1-row steps' scale
    1.21
    """

    RATE = 0.2  # weight of the latest step in the running ratio
    OUTLIER = 4.0  # a step this many times its expected time is a pause of the machine, not a cost
    STALE = 20  # steps after which a ratio not timed since starts drifting
    DRIFT = 0.05  # per step, toward the ratio just timed

    def __init__(self, curve: CostCurve, source: dict | None = None):
        self.curve = curve
        self.source = source  # the backend's curve it was made from (a new one replaces it)
        self.ratio: dict[int, float] = {}
        self.untimed: dict[int, int] = {}  # q -> steps since a step of q rows was timed

    def __call__(self, q: int) -> float:
        if not self.ratio:
            return self.curve(q)
        nearest = min(self.ratio, key=lambda r: (abs(math.log(r / q)), r))
        return self.curve(q) * self.ratio[nearest]

    def observe(self, q: int, seconds: float) -> None:
        expected = self(q)
        if seconds > self.OUTLIER * expected:
            return
        r = seconds / self.curve(q)
        self.ratio[q] = r if q not in self.ratio else (1 - self.RATE) * self.ratio[q] + self.RATE * r
        self.untimed[q] = 0
        for k in self.ratio:
            if k != q:
                self.untimed[k] = self.untimed.get(k, 0) + 1
                if self.untimed[k] > self.STALE:
                    self.ratio[k] += self.DRIFT * (self.ratio[q] - self.ratio[k])


def step_costs(target, kind: str) -> StepCosts:
    """The StepCosts of drafter `kind` on `target`, kept with its model (new when its curve changed)."""
    curve = target.cost_curve()
    state = target.drafter_state()
    costs = state.get(("step-costs", kind))
    if costs is None or costs.source is not curve:
        costs = state[("step-costs", kind)] = StepCosts(CostCurve.from_dict(curve), curve)
    return costs


class AutoBudget:
    """Per generation: the step costs (the target's cost curve, corrected by timed steps) and the
    drafter's calibration.

    `choose` times the interval between successive calls, i.e. one whole engine step of the rows
    chosen last (forward, acceptance, drafting), and feeds it to the step costs.
    """

    def __init__(self, target, prior: float = 1.0, kind: str = "default", session=None):
        """target: the Backend whose measured cost curve prices each tree; kind: the drafter's
        name, under which the corrected step costs are kept across requests; session: the
        generation's (decode.Session), whose `rows_beside` (rows other generations add to a
        shared forward) every tree is priced after: a full batch drafts less, one request alone
        exactly as without it."""
        self.step_costs = step_costs(target, kind)
        self.session = session
        self.calibration = Calibration(prior)
        self._last: tuple[float, int] | None = None  # (time of the last choice, its rows)
        self._calls = 0

    def cost(self, q: int) -> float:
        """Seconds of a step in which this generation runs q rows (and the others theirs)."""
        return self.step_costs(q + self.beside())

    def beside(self) -> int:
        """Rows the other generations of a shared forward run (0 alone)."""
        return getattr(self.session, "rows_beside", 0) if self.session is not None else 0

    def tokens_beside(self) -> float:
        """Tokens the other generations of a shared forward emit per step (0 alone): a tree that
        slows the forward delays theirs too."""
        return getattr(self.session, "tokens_beside", 0.0) if self.session is not None else 0.0

    def calibrated(self, scores: list[float], depths: list[int]) -> list[float]:
        """Scores (path probabilities) times factor^depth: each conditional probability rescaled."""
        c = self.calibration.factor
        return [min(1.0, s * c**d) for s, d in zip(scores, depths)]

    def _time_last_step(self) -> float:
        now = time.perf_counter()
        self._calls += 1
        if self._last is not None and self._calls > 2:  # the 1st interval holds the prompt's prefill
            self.step_costs.observe(self._last[1], now - self._last[0])
        return now

    def choose(self, scores: list[float], rows: Callable[[int], int]) -> int:
        """The number of (already calibrated) best-first nodes to verify this step."""
        now = self._time_last_step()
        n = best_size(scores, rows, self.cost, self.tokens_beside())
        self._last = (now, self.beside() + rows(n))
        return n

    def choose_plan(self, scores: list[float], plans: dict[str, tuple[Callable[[int], int], float]]) -> tuple[str, int]:
        """`choose` over several plans (best_plan): the plan and the number of nodes."""
        now = self._time_last_step()
        name, n = best_plan(scores, plans, self.cost, self.tokens_beside())
        self._last = (now, self.beside() + plans[name][0](n))
        return name, n

    def size(self, scores: list[float], depths: list[int], rows: Callable[[int], int]) -> int:
        return self.choose(self.calibrated(scores, depths), rows)

    def observe_scores(self, scores: list[float], parents: list[int], path: list[int]) -> None:
        """`observe` from path scores (scores[i]: node i's raw path probability, as given to `size`)."""
        self.observe([s / (scores[p] if p >= 0 else 1.0) for s, p in zip(scores, parents)], parents, path)

    def observe(self, conditional: list[float], parents: list[int], path: list[int]) -> None:
        """conditional[i]: node i's probability given its parent (the drafter's raw estimate)."""
        tested = nodes_tested(parents, path)
        on_path = set(path)
        self.calibration.update(sum(conditional[i] for i in tested), sum(1 for i in tested if i in on_path))
