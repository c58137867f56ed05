"""Unit tests of the n-gram drafters (prompt lookup, lookahead): pure functions and fake sessions, no model."""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import pytest
import torch

from specprobe.drafters import lookahead, make_drafter, ngram
from specprobe.drafters.lookahead import JacobiWindow, LookaheadConfig, LookaheadDrafter, window_layout
from specprobe.drafters.ngram import NGramPool, build_trie, find_continuations
from specprobe.drafters.prompt_lookup import PLDConfig, PLDDrafter
from specprobe.engine.protocol import Acceptance, Proposal, StepResult, VerifyOutput
from specprobe.engine.tree import ROOT, Layout, rows_structure
from specprobe.errors import InvalidOptionError

VOCAB = 50


@pytest.mark.parametrize("module", [ngram, lookahead])
def test_docstring_examples(module):
    failed, attempted = doctest.testmod(module)
    assert attempted > 0 and failed == 0


# -- prompt lookup: the search ---------------------------------------------------------------


def test_worked_example():
    # "a b c d a b x a b": "a b" occurred at 4 (then "x a b") and at 0 (then "c d a")
    assert find_continuations([1, 2, 3, 4, 1, 2, 9, 1, 2], max_ngram=3, num_pred_tokens=3) == [[9, 1, 2], [3, 4, 1]]


def test_no_match():
    assert find_continuations([1, 2, 3, 4, 5]) == []


@pytest.mark.parametrize("ids", [[], [7], [7, 8]])
def test_ngram_longer_than_text(ids):
    # max_ngram 3 exceeds the text: shorter n still searched, nothing breaks
    assert find_continuations(ids, max_ngram=3) == []


def test_short_text_still_matches_shorter_ngram():
    assert find_continuations([5, 6, 5], max_ngram=3) == [[6, 5]]


def test_longer_ngram_first_then_most_recent():
    # suffix "1 2": n=2 matches at 0 (-> 3); n=1 "2" also matches at 5 (-> 8) and 0 (seen)
    ids = [1, 2, 3, 9, 9, 2, 8, 1, 2]
    assert find_continuations(ids, max_ngram=2, num_pred_tokens=1) == [[3], [8]]
    # several matches of one n: most recent first
    ids = [4, 1, 4, 2, 4, 3, 4]
    assert find_continuations(ids, max_ngram=1, num_pred_tokens=1) == [[3], [2], [1]]


def test_max_candidates_and_duplicates():
    ids = [4, 1, 4, 2, 4, 1, 4, 3, 4]
    assert find_continuations(ids, max_ngram=1, num_pred_tokens=1, max_candidates=2) == [[3], [1]]
    # "1" appears twice after 4: one candidate only
    assert find_continuations(ids, max_ngram=1, num_pred_tokens=1) == [[3], [1], [2]]


def _continuations_by_definition(ids, max_ngram, min_ngram, num_pred_tokens, max_candidates):
    """find_continuations' docstring spelt out: every start s, most recent first, per n."""
    found = []
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        for s in range(len(ids) - n - 1, -1, -1):
            cont = ids[s + n : s + n + num_pred_tokens]
            if ids[s : s + n] != ids[len(ids) - n :] or any(c[: len(cont)] == cont for c in found):
                continue
            shorter = [i for i, c in enumerate(found) if cont[: len(c)] == c]
            if shorter:
                found[shorter[0]] = cont
            else:
                found.append(cont)
            if len(found) >= max_candidates:
                return found
    return found


def test_search_equals_its_definition_on_random_texts():
    # the search starts from the positions of the last token (list.index); same answers, same order
    rng = torch.Generator().manual_seed(0)
    for _ in range(3000):
        size, alphabet = (int(v) for v in torch.randint(0, 40, (2,), generator=rng))
        ids = torch.randint(0, 2 + alphabet // 4, (size,), generator=rng).tolist()
        max_ngram, num_pred, max_cand = (1 + int(v) for v in torch.randint(0, 5, (3,), generator=rng))
        min_ngram = 1 + int(torch.randint(0, max_ngram, (1,), generator=rng))
        args = (max_ngram, min_ngram, num_pred, max_cand)
        assert find_continuations(ids, *args) == _continuations_by_definition(ids, *args), (ids, args)


def test_min_ngram_excludes_short_matches():
    ids = [1, 2, 3, 9, 2]
    assert find_continuations(ids, max_ngram=3, min_ngram=2) == []
    assert find_continuations(ids, max_ngram=3, min_ngram=1) == [[3, 9, 2]]


def test_several_matches_become_one_trie():
    ids = [7, 1, 2, 3, 7, 1, 2, 4, 7, 5, 7]
    conts = find_continuations(ids, max_ngram=1, num_pred_tokens=3)
    assert conts == [[5, 7], [1, 2, 4], [1, 2, 3]]
    tree = build_trie(conts, budget=32)
    assert tree.tokens == [5, 7, 1, 2, 4, 3]
    assert tree.parents == [ROOT, 0, ROOT, 2, 3, 3]  # "1 2" shared by the last two


def test_trie_budget_cuts_in_order():
    tree = build_trie([[1, 2, 3], [1, 5, 6], [9]], budget=4)
    assert tree.tokens == [1, 2, 3, 5]
    assert tree.parents == [ROOT, 0, 1, 0]
    assert len(build_trie([], budget=4)) == 0


def test_pld_drafter_proposes_the_trie():
    drafter = make_drafter("pld", num_pred_tokens=2)
    tree = drafter.propose(SimpleNamespace(ids=[3, 4, 5, 3, 4, 6, 3, 4])).tree
    # "3 4" was followed by "6 3" (most recent) and "5 3"
    assert tree.tokens == [6, 3, 5, 3] and tree.parents == [ROOT, 0, ROOT, 2]
    assert len(drafter.propose(SimpleNamespace(ids=[1, 2, 3])).tree) == 0


BAD_PLD = [dict(max_ngram=0), dict(min_ngram=4, max_ngram=3), dict(num_pred_tokens=0), dict(budget=-1), dict(max_candidates=1.5)]


@pytest.mark.parametrize("options", BAD_PLD)
def test_pld_config_rejects_bad_values(options):
    with pytest.raises(InvalidOptionError):
        PLDConfig(**options)
    with pytest.raises(InvalidOptionError):
        make_drafter("pld", **options)


def test_pld_default_config():
    assert isinstance(make_drafter("pld"), PLDDrafter)
    assert PLDConfig().max_ngram == 3 and PLDConfig().min_ngram == 1


# -- lookahead: the n-gram pool ----------------------------------------------------------------


def test_pool_insert_and_lookup_most_recent_first():
    pool = NGramPool(n=3, per_key=3, max_keys=10)
    pool.insert(1, (2, 3))
    pool.insert(1, (4, 5))
    pool.insert(6, (7, 8))
    assert pool.lookup(1) == [(4, 5), (2, 3)]
    assert pool.lookup(6) == [(7, 8)]
    assert pool.lookup(99) == []
    pool.insert(1, (2, 3))  # re-inserted: the most recent again, not duplicated
    assert pool.lookup(1) == [(2, 3), (4, 5)]
    pool.insert(1, (2,))  # wrong length: ignored
    assert len(pool) == 3


def test_pool_guess_limit_drops_oldest():
    pool = NGramPool(n=2, per_key=2, max_keys=10)
    for t in (10, 11, 12):
        pool.insert(1, (t,))
    assert pool.lookup(1) == [(12,), (11,)]


def test_pool_is_bounded_in_keys():
    pool = NGramPool(n=2, per_key=2, max_keys=3)
    for key in range(4):
        pool.insert(key, (key + 100,))
    assert pool.lookup(0) == []  # the least recently touched key went
    assert [pool.lookup(k) for k in (1, 2, 3)] == [[(101,)], [(102,)], [(103,)]]
    pool.insert(1, (200,))  # touching key 1 makes key 2 the oldest
    pool.insert(9, (9,))
    assert pool.lookup(2) == [] and pool.lookup(1) == [(200,), (101,)]
    assert len(pool) <= 3 * 2


def test_pool_add_text():
    pool = NGramPool(n=3, per_key=7, max_keys=100)
    pool.add_text([1, 2, 3, 1, 2, 4])
    assert pool.lookup(1) == [(2, 4), (2, 3)]
    assert pool.lookup(2) == [(3, 1)]
    pool.add_text([1, 2, 3, 1, 2, 4, 5], start=4)
    assert pool.lookup(2) == [(4, 5), (3, 1)]


# -- lookahead: the window ---------------------------------------------------------------------


@pytest.mark.parametrize("w,n", [(7, 5), (3, 3), (1, 4)])
def test_window_rows_follow_jacobi_trajectories(w, n):
    """Each row sees exactly the root, level 0 up to its column and its own column below it, at
    consecutive positions (checked on the mask the engine builds)."""
    offsets, sees = window_layout(w, n)
    m = (w - 1) + (n - 2) * w
    assert len(offsets) == len(sees) == m
    layout = Layout(1, (), (ROOT,) * m, offsets, sees)
    vis, pos = rows_structure(layout)
    rows = [(0, k) for k in range(1, w)] + [(lv, i) for lv in range(1, n - 1) for i in range(w)]
    for r, (level, col) in enumerate(rows):
        seen = [rows[c - 1] for c in range(1, 1 + m) if vis[1 + r, c]]
        expected = [(0, k) for k in range(1, col + 1)] + [(lv, col) for lv in range(1, level + 1)]
        assert seen == expected
        assert vis[1 + r, 0]  # the root
        chain = [0] + [pos[1 + rows.index(s)].item() for s in seen]
        assert chain == list(range(len(chain)))  # consecutive positions: root, +1, +2, ...
        assert pos[1 + r].item() == col + level


def test_window_from_prompt_is_seeded():
    a = JacobiWindow.from_prompt([5, 6, 7], w=4, n=4, seed=0)
    assert [len(level) for level in a.levels] == [3, 4, 4]
    assert set(a.tokens()) <= {5, 6, 7}
    assert a == JacobiWindow.from_prompt([5, 6, 7], w=4, n=4, seed=0)


def test_window_ngrams_and_advance():
    win = JacobiWindow([[1, 2], [3, 4, 5], [6, 7, 8]])  # w=3, n=4
    assert win.ngrams(0, [9, 10, 11]) == [(0, (3, 6, 9)), (1, (4, 7, 10)), (2, (5, 8, 11))]
    assert win.advance([9, 10, 11]).levels == [[4, 5], [6, 7, 8], [9, 10, 11]]


class FakeTarget:
    dtype = torch.float32

    def embed(self, ids):
        return torch.zeros(len(ids), 4)  # [len, hidden]


def one_hot_logits(tokens: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(tokens), VOCAB)  # [rows, vocab]
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return logits


def step_with(proposal, top_tokens: list[int], emitted: list[int]) -> StepResult:
    m = len(proposal.aux)
    aux_logits = torch.cat([one_hot_logits([0] * (m - len(top_tokens))), one_hot_logits(top_tokens)])  # [m, vocab]
    out = VerifyOutput(one_hot_logits([emitted[-1]] * (1 + len(proposal.tree))), aux_logits)
    return StepResult(proposal, out, Acceptance([], emitted), emitted)


def test_lookahead_observe_advances_window_and_harvests():
    cfg = LookaheadConfig(window=3, ngram=3, guess=2, prompt_pool=False)
    drafter = LookaheadDrafter(cfg)
    session = SimpleNamespace(ids=[1, 2, 3, 4], target=FakeTarget())
    drafter.start(session)
    assert len(drafter.pool) == 0
    p1 = drafter.propose(session)
    assert len(p1.tree) == 0 and len(p1.aux) == 2 + 3  # level 0: w-1 rows, level 1: w rows
    assert p1.aux.anchor == [ROOT] * 5 and p1.aux.embeds.shape == (5, 4)
    before = drafter.window
    session.ids.append(40)
    drafter.observe(session, step_with(p1, [20, 21, 22], [40]))
    # warm-up (n - 2 = 1 step): the window advanced, nothing harvested yet
    assert drafter.window.levels == [before.levels[1][1:], [20, 21, 22]]
    assert len(drafter.pool) == 0
    p2 = drafter.propose(session)
    session.ids.append(41)
    drafter.observe(session, step_with(p2, [30, 31, 32], [41]))
    # columns spell (root 40 | level-0 tokens) -> (level 1, new top)
    b1, b2 = before.levels[1][1:]  # level 0 of step 2
    assert drafter.pool.lookup(40) == [(20, 30)]
    assert (21, 31) in drafter.pool.lookup(b1) and (22, 32) in drafter.pool.lookup(b2)
    assert len(drafter.pool) == 3
    assert drafter.window.levels == [[21, 22], [30, 31, 32]]
    # the verification branch proposes the pool's n-grams after the root
    drafter.pool.insert(41, (5, 6))
    drafter.pool.insert(41, (5, 7))
    tree = drafter.propose(session).tree
    assert tree.tokens == [5, 7, 6] and tree.parents == [ROOT, 0, 0]


def test_lookahead_guess_limit_in_tree():
    drafter = LookaheadDrafter(LookaheadConfig(window=2, ngram=3, guess=2))
    session = SimpleNamespace(ids=[9, 1, 2, 9, 3, 4, 9, 5, 6, 9], target=FakeTarget())
    drafter.start(session)  # the prompt seeds 9 -> (1 2), (3 4), (5 6): G = 2 keeps the last two
    tree = drafter.propose(session).tree
    assert tree.tokens == [5, 6, 3, 4]


def test_lookahead_skips_window_update_without_rows():
    drafter = LookaheadDrafter(LookaheadConfig(prompt_pool=False))
    session = SimpleNamespace(ids=[1, 2, 3], target=FakeTarget())
    drafter.start(session)
    before = drafter.window
    empty = StepResult(Proposal(), VerifyOutput(one_hot_logits([4]), None), Acceptance([], [4]), [4], drafts_dropped=True)
    session.ids.append(4)
    drafter.observe(session, empty)
    assert drafter.window == before


@pytest.mark.parametrize("options", [dict(window=0), dict(ngram=2), dict(guess=-1), dict(pool_keys=0), dict(prompt_pool="yes")])
def test_lookahead_config_rejects_bad_values(options):
    with pytest.raises(InvalidOptionError):
        make_drafter("lookahead", **options)


def test_lookahead_defaults_match_spec_bench():
    cfg = LookaheadConfig()
    assert (cfg.window, cfg.ngram, cfg.guess, cfg.prompt_pool) == (7, 5, 7, True)
