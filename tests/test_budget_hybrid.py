"""The hardware-aware budget (budget.py) and the hybrid drafter (drafters/hybrid.py).

Pure parts on made-up numbers; then the hybrid (auto and fixed budgets) token-for-token against
transformers' `generate` on both built-in models.
"""

from __future__ import annotations

import doctest

import pytest

import specprobe
from conftest import hf_greedy, varied_prompts
from specprobe.backends.torch import profile as torch_profile
from specprobe.commands.main import main
from specprobe.drafters import hybrid, make_drafter
from specprobe.drafters.hybrid import ScoredPath, SourceRates, merge_scored
from specprobe.engine import budget, cost_curve
from specprobe.engine.budget import AutoBudget, Calibration, CostCurve, StepCosts, best_size, nodes_tested, parse_budget
from specprobe.engine.tree import ROOT
from specprobe.errors import InvalidOptionError
from specprobe.models import format_prompt


@pytest.mark.parametrize("module", [budget, cost_curve, hybrid])
def test_docstring_examples(module):
    failed, attempted = doctest.testmod(module)
    assert attempted > 0 and failed == 0


# -- cost curve and best size ---------------------------------------------------------------------
def test_cost_curve_interpolates_and_extrapolates():
    c = CostCurve.from_dict({1: 1.0, 4: 1.6, 8: 3.6})
    assert c(1) == 1.0 and c(0) == 1.0
    assert c(2) == pytest.approx(1.2)
    assert c(6) == pytest.approx(2.6)
    assert c(12) == pytest.approx(5.6)  # the last segment's slope, 0.5 per row


def test_an_unsteady_cost_curve_is_measured_again_and_never_saved(monkeypatch, tmp_path, capsys):
    busy = {1: 0.31, 2: 0.51, 6: 1.27, 32: 0.65}  # measured here during an install: T(32) is 0.51x T(6)
    quiet = {1: 0.034, 2: 0.035, 6: 0.047, 32: 0.097}
    runs = iter([busy, quiet])
    monkeypatch.setattr(cost_curve, "forward_times", lambda *a, **k: next(runs))
    assert cost_curve.measure_cost_curve(None) == (quiet, True)

    class Target:
        def set_cost_curve(self, times):
            pass

    path = tmp_path / "curve.json"
    monkeypatch.setattr(torch_profile, "_curve_file", lambda target: path)
    monkeypatch.setattr(cost_curve, "forward_times", lambda *a, **k: dict(busy))
    assert torch_profile.cost_curve(Target()) == busy  # this process uses it ...
    assert not path.exists()  # ... and the next one measures again
    assert "busy while the cost curve was measured" in capsys.readouterr().err
    monkeypatch.setattr(cost_curve, "forward_times", lambda *a, **k: dict(quiet))
    assert torch_profile.cost_curve(Target()) == quiet and path.exists()


SCORES = [0.9, 0.8, 0.6, 0.5, 0.3, 0.2, 0.1, 0.05]


def test_flat_cost_takes_every_useful_node():
    flat = CostCurve([1, 64], [1.0, 1.0])
    assert best_size(SCORES, rows=lambda n: 1 + n, cost=flat) == len(SCORES)


def test_steep_cost_takes_nothing():
    steep = CostCurve([1, 2, 64], [1.0, 2.0, 64.0])  # a second row costs as much as the first
    assert best_size(SCORES, rows=lambda n: 1 + n, cost=steep) == 0


def test_gpu_like_and_cpu_like_curves_give_the_expected_sizes():
    # GPU-like: flat to 16 rows, then linear. Rows = 1 + 2n (ESP with one mask per node, no root mask).
    gpu = CostCurve([1, 16, 64], [1.0, 1.0, 4.0])
    assert best_size(SCORES, rows=lambda n: 1 + 2 * n, cost=gpu) == 7  # 15 rows fit the flat part; 17 rows cost 1.0625
    # CPU-like: 1.4x at 2 rows and flat to 4, then 0.15 per row
    cpu = CostCurve([1, 2, 4, 64], [1.0, 1.4, 1.4, 10.4])
    # n=1: 1.9/1.4=1.36; n=2 (4 rows... rows=1+n): 2.7/1.4 (3 rows)=1.93; n=3 (4 rows): 3.3/1.4=2.36; n=4: 3.8/1.55=2.45;
    # n=5: 4.1/1.7=2.41
    assert best_size(SCORES, rows=lambda n: 1 + n, cost=cpu) == 4


@pytest.mark.parametrize("stale", [None, 10**9])
def test_one_slow_step_does_not_stop_drafting_for_good(monkeypatch, stale):
    """A 2-row step slowed by a pause prices 2 rows too high to run; while only 1-row steps run,
    the 2-row price drifts back to the curve's shape, and a likely draft is verified again.
    Negative control (stale = 10**9, no drift): the budget stays at 0 drafts."""
    if stale is not None:
        monkeypatch.setattr(StepCosts, "STALE", stale)
    costs = StepCosts(CostCurve([1, 2, 3], [0.012, 0.0155, 0.019]))  # llama.cpp's SmolLM2 curve here, T(2)/T(1) 1.29
    draft = [0.5]  # one node accepted half the time: worth its row at 1.29x, not at 2x
    rows = lambda n: 1 + n
    assert best_size(draft, rows, costs) == 1
    costs.observe(1, 0.012)
    costs.observe(2, 0.040)  # a pause: 2.6x the curve, under the outlier cut
    assert best_size(draft, rows, costs) == 0
    drafted = []
    for _ in range(100):  # what the budget runs then is what gets timed (about a second of steps)
        n = best_size(draft, rows, costs)
        drafted.append(n)
        costs.observe(rows(n), 0.012 * (1.29 if n else 1.0))
    if stale is None:
        assert drafted[-1] == 1 and 20 < drafted.index(1) <= 80
    else:
        assert drafted == [0] * 100


def test_calibration_rescales_by_depth():
    auto = AutoBudget.__new__(AutoBudget)
    auto.step_costs = StepCosts(CostCurve([1, 64], [1.0, 1.0]))
    auto.calibration = Calibration(prior=1.0, weight=1.0)
    auto.observe([0.5, 0.5], parents=[ROOT, 0], path=[])  # tested: node 0 only (node 1's parent failed)
    assert auto.calibration.factor == pytest.approx(1.0 / 1.5)
    assert auto.calibrated([0.6, 0.3], depths=[1, 2]) == pytest.approx([0.6 / 1.5, 0.3 / 1.5**2])


def test_nodes_tested():
    assert nodes_tested([ROOT, 0, 1, ROOT], path=[0]) == [0, 1, 3]


@pytest.mark.parametrize("bad", ["0", "-3", "many", 2.5, None])
def test_parse_budget_rejects(bad):
    with pytest.raises(InvalidOptionError):
        parse_budget(bad)


def test_parse_budget_accepts():
    assert parse_budget("auto") == "auto" and parse_budget("12") == 12 and parse_budget(3) == 3


def test_cli_bad_budget_is_one_line(capsys):
    assert main(["generate", "--method", "esp", "--budget", "lots", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "budget" in err


def test_pld_rejects_auto():
    with pytest.raises(InvalidOptionError, match="hybrid"):
        make_drafter("pld", budget="auto")


# -- the merge --------------------------------------------------------------------------------------
def test_merge_is_a_trie_ordered_by_score():
    paths = [
        ScoredPath("pld", [1, 2, 3, 4], [0.9, 0.8, 0.7, 0.6]),
        ScoredPath("pool", [1, 2, 5], [0.5, 0.4, 0.3]),
        ScoredPath("esp", [6, 7], [0.85, 0.95]),  # not monotone: clipped to its parent's score
        ScoredPath("esp", [1, 9], [0.95, 0.2]),
    ]
    tree, scores, sources = merge_scored(paths)
    assert all(p == ROOT or p < i for i, p in enumerate(tree.parents))
    assert scores == sorted(scores, reverse=True)
    for i, p in enumerate(tree.parents):
        assert p == ROOT or scores[i] <= scores[p]
    spelled = {tuple(tree.tokens[j] for j in tree.path_to(i)) for i in range(len(tree))}
    assert spelled == {(1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), (1, 2, 5), (6,), (6, 7), (1, 9)}
    first = tree.tokens.index(1)
    assert tree.parents[first] == ROOT and scores[first] == 0.95 and set(sources[first]) == {"pld", "pool", "esp"}
    # every prefix of the ranking is a tree: the budget can cut anywhere
    for n in range(len(tree) + 1):
        pre = tree.prefix(n)
        assert all(p == ROOT or p < n for p in pre.parents)


def test_source_rates_move_from_the_prior():
    r = SourceRates()
    assert r.rate("pld#0", 1) == pytest.approx(0.6)
    assert r.rate("pld#1", 1) == pytest.approx(0.3)  # a lower-ranked candidate starts lower
    for _ in range(8):
        r.update("pld#0", 1, True)
    assert r.rate("pld#0", 1) == pytest.approx((8 + 1.2) / 10)
    assert r.rate("pld#0", 2) == pytest.approx(0.6)  # depths are counted apart
    assert r.rate("pld#1", 1) == pytest.approx(0.3)  # and ranks
    assert r.rate("pld#0@copy", 1) == pytest.approx(0.85)  # copy mode starts higher, counted apart
    r.update("pld#0@copy", 1, False)
    assert r.rate("pld#0@copy", 1) == pytest.approx(1.7 / 3)
    assert r.rate("pld#0", 1) == pytest.approx((8 + 1.2) / 10)


# -- losslessness ---------------------------------------------------------------------------------
NEW_TOKENS = 40


@pytest.mark.parametrize("options", [{}, {"budget": 6}], ids=["auto", "fixed6"])
@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_hybrid_identical_to_hf_generate(model_name, options, request, spec_bench_questions):
    lm = request.getfixturevalue(model_name)
    forwards = new = 0
    for prompt in varied_prompts(spec_bench_questions, 2):
        ids = format_prompt(lm.tokenizer, prompt)
        out = specprobe.generate(lm.model, lm.tokenizer, ids, method="hybrid", max_new_tokens=NEW_TOKENS, **options)
        assert out.token_ids == hf_greedy(lm, ids, NEW_TOKENS), prompt[:60]
        forwards, new = forwards + out.stats.target_forwards, new + out.stats.new_tokens
    # the drafts are accepted: not `ar` in disguise. With --budget auto the tree size follows the
    # machine's timings (it may rightly choose tiny trees on a busy CPU), so only some gain is required
    assert new / forwards > (1.1 if options else 1.0)
