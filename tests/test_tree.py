"""Tree layout, masks, positions, greedy acceptance and the ESP tree builder: pure unit tests."""

import pytest
import torch

from specprobe.backends.torch.masks import attention_masks
from specprobe.drafters.esp import DepthCandidates, build_tree
from specprobe.engine.sampling import greedy_accept
from specprobe.engine.tree import ROOT, AuxRows, DraftTree, Layout, rows_structure


def test_tree_rejects_parent_after_child():
    with pytest.raises(ValueError):
        DraftTree([1, 2], [1, ROOT])


def test_tree_helpers():
    t = DraftTree([10, 11, 12, 13], [ROOT, ROOT, 0, 2])
    assert t.depths() == [1, 1, 2, 3]
    assert t.children() == [[0, 1], [2], [], [3], []]
    assert t.path_to(3) == [0, 2, 3]
    assert DraftTree.chain([5, 6, 7]).parents == [-1, 0, 1]


def test_layout_visibility_and_positions():
    # 2 pending tokens, tree: a (root child), b (root child), c (child of a); one mask chain of 2 after c
    tree = DraftTree([1, 2, 3], [ROOT, ROOT, 0])
    aux = AuxRows(torch.zeros(2, 4), anchor=[2, 2], offset=[1, 2], sees=[(), (0,)])
    vis, off = rows_structure(Layout.of(2, tree, aux))
    # rows: p0 p1 a b c m0 m1
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 1, 0, 1, 0, 0],
        [1, 1, 1, 0, 1, 1, 0],
        [1, 1, 1, 0, 1, 1, 1],
    ]
    assert vis.int().tolist() == expected
    assert off.tolist() == [0, 1, 2, 2, 3, 4, 5]
    # no real row sees an auxiliary row
    assert not vis[:5, 5:].any()


def test_attention_masks_past_and_sliding_window():
    layout = Layout.of(1, DraftTree([7, 8], [ROOT, 0]), None)
    full, sliding, pos = attention_masks(layout, past_len=5, dtype=torch.float32, device=torch.device("cpu"), sliding_window=3)
    assert full.shape == (1, 1, 3, 8) and pos.tolist() == [[5, 6, 7]]
    allowed = full[0, 0] == 0
    assert allowed[:, :5].all()  # the cache is visible to every row
    assert allowed[2, 5:].tolist() == [True, True, True]
    win = sliding[0, 0] == 0
    # row at position 7 with window 3 sees keys at positions 5, 6, 7 only
    assert win[2].tolist() == [False] * 5 + [True, True, True]
    assert win[0].tolist() == [False, False, False, True, True, True, False, False]


def test_chain_layout_is_chain():
    assert Layout.of(4, DraftTree.chain([1, 2]), None).is_chain
    assert not Layout.of(1, DraftTree([1, 2], [ROOT, ROOT]), None).is_chain


def fake_logits(choices: list[int], vocab: int = 20) -> torch.Tensor:
    logits = torch.zeros(len(choices), vocab)
    for r, c in enumerate(choices):
        logits[r, c] = 1.0
    return logits


def test_greedy_accept_walks_the_matching_branch():
    # root -> {5, 6}; 6 -> {7}; target says: after root 6, after 6 7, after 7 9 (bonus)
    tree = DraftTree([5, 6, 7], [ROOT, ROOT, 1])
    acc = greedy_accept(tree, fake_logits([6, 0, 7, 9]))
    assert acc.path == [1, 2] and acc.tokens == [6, 7, 9] and acc.bonus == 9


def test_greedy_accept_rejects_all():
    tree = DraftTree([5, 6], [ROOT, ROOT])
    acc = greedy_accept(tree, fake_logits([3, 0, 0]))
    assert acc.path == [] and acc.tokens == [3]


def test_esp_tree_prunes_parent_token_and_respects_budget():
    depths = [DepthCandidates([4, 1, 2, 3], [0.4, 0.3, 0.2, 0.1]), DepthCandidates([1, 5, 6], [0.5, 0.3, 0.2])]
    tree = build_tree(4, depths, budget=4, branching=2)
    assert len(tree) == 4
    assert 4 not in [tree.tokens[i] for i, p in enumerate(tree.parents) if p == ROOT]
    for i, p in enumerate(tree.parents):
        if p != ROOT:
            assert tree.tokens[i] != tree.tokens[p]
    # best-first: 1 (0.3), 2 (0.2), then 1 under 2 (0.2 * 0.5 = 0.1) before 5 under 1 (0.3 * 0.3 = 0.09)
    assert tree.tokens[:2] == [1, 2]
    assert (tree.tokens[2], tree.parents[2]) == (1, 1)
