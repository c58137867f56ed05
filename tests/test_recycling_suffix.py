"""Token Recycling and suffix decoding: their data structures as pure units, and both methods
token-identical to plain decoding on both built-in models, with drafts accepted."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specprobe
from specprobe.drafters import forget_outputs
from specprobe.drafters.suffix import CHILDREN, COUNT, OUTPUTS_KEY, GlobalOutputs, SuffixTrie, speculate
from specprobe.drafters.token_recycling import MATRIX_KEY, TAIL_CUT, AdjacencyMatrix, top_k_probabilities
from specprobe.errors import InvalidOptionError
from specprobe.models import format_prompt

NEW_TOKENS = 48


# -- the adjacency matrix ------------------------------------------------------------------------
def test_matrix_keeps_the_latest_prediction_after_each_token():
    m = AdjacencyMatrix(vocab=6, k=2)
    first = torch.full((1, 6), -10.0)
    first[0, 4] = 5.0
    m.update([2], first)
    second = torch.full((1, 6), -10.0)
    second[0, 1] = 5.0
    second[0, 3] = 4.0
    m.update([2], second)  # the newer row replaces the older
    assert m.ids[2].tolist() == [1, 3] and m.probs[2, 0] > m.probs[2, 1]
    assert m.ids[0].tolist() == [-1, -1]


def test_matrix_expansion_is_best_first_and_bounded():
    rng = torch.Generator().manual_seed(0)
    m = AdjacencyMatrix(vocab=50, k=4)
    m.update(list(range(50)), torch.randn(50, 50, generator=rng) * 3)
    tree, scores = m.expand(7, max_nodes=20, max_depth=3)
    assert len(tree) == 20 and max(tree.depths()) <= 3
    assert scores == sorted(scores, reverse=True)
    for i, p in enumerate(tree.parents):
        if p >= 0:
            assert scores[i] <= scores[p] and tree.tokens[i] in m.ids[tree.tokens[p]].tolist()


def test_top_k_probabilities_match_the_exact_softmax():
    """The CPU path's normalizer leaves out logits more than TAIL_CUT below a row's largest: the
    ids equal torch.topk's and each probability is within vocab x e^-16 of the exact one
    (relative), on rows shaped like a language model's (a few likely tokens, many unlikely ones,
    a long tail far below), on flat rows, where every logit is in the band, and on a row with
    fewer than k logits in the band."""
    gen = torch.Generator().manual_seed(0)
    vocab = 50_000
    peaked = torch.randn(6, vocab, generator=gen) * 0.1 - 40.0  # a long tail far below: cut
    peaked[:, 10:20_000] += 28.0  # a wide band 12 below the top, 1 % of a row's mass: kept (a cut at 8 loses it and fails the bound)
    peaked[:, :10] = torch.randn(6, 10, generator=gen) * 0.5  # the likely tokens, near 0
    flat = torch.randn(3, vocab, generator=gen) * 0.5
    few = torch.randn(1, vocab, generator=gen) - 100.0
    few[0, 7] = 0.0  # one logit in the band, fewer than k: the exact path
    bound = vocab * math.exp(-16.0)  # the documented bound, fixed here: a narrower cut must fail it
    for logits in (peaked, flat, few):
        ids, probs = top_k_probabilities(logits, 8)
        exact = torch.topk(logits, 8, dim=-1)
        exact_probs = (exact.values - torch.logsumexp(logits, -1, keepdim=True)).exp()
        assert torch.equal(ids, exact.indices)
        assert ((probs - exact_probs).abs() <= exact_probs * bound + 1e-7).all()
        assert (probs >= exact_probs * (1 - 1e-5)).all()  # a smaller normalizer: never lower
    cut = (peaked >= peaked.amax(-1, keepdim=True) - TAIL_CUT).sum(-1)
    assert (cut == 20_000).all()  # the peaked rows did run on a band, the tail left out


def test_matrix_state_round_trip_and_bad_files(tmp_path):
    m = AdjacencyMatrix(vocab=10, k=3)
    m.update([1, 2], torch.randn(2, 10))
    path = tmp_path / "recycle.pt"
    m.save(path)
    back = AdjacencyMatrix.load(path, vocab=10, k=3)
    assert torch.equal(back.ids, m.ids) and torch.equal(back.probs, m.probs)
    with pytest.raises(InvalidOptionError, match="not a token-recycling state for this model"):
        AdjacencyMatrix.load(path, vocab=11, k=3)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InvalidOptionError, match="cannot read"):
        AdjacencyMatrix.load(tmp_path / "junk.pt", vocab=10, k=3)


# -- the suffix trie -------------------------------------------------------------------------------
def substring_counts(sequences: list[list[int]], depth: int) -> Counter:
    counts = Counter()
    for seq in sequences:
        for s in range(len(seq)):
            for e in range(s + 1, min(len(seq), s + depth) + 1):
                counts[tuple(seq[s:e])] += 1
    return counts


def trie_counts(trie: SuffixTrie) -> Counter:
    out, stack = Counter(), [((), trie.root)]
    while stack:
        prefix, node = stack.pop()
        for t, child in node[CHILDREN].items():
            out[prefix + (t,)] = child[COUNT]
            stack.append((prefix + (t,), child))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), max_size=30), min_size=1, max_size=5), st.integers(2, 6), st.data())
def test_trie_counts_every_substring_and_removal_undoes_adding(sequences, depth, data):
    trie = SuffixTrie(max_depth=depth)
    for seq in sequences:
        trie.add(seq)
    assert trie_counts(trie) == substring_counts(sequences, depth)
    removed = data.draw(st.sets(st.integers(0, len(sequences) - 1)))
    for i in removed:
        trie.remove(sequences[i])
    kept = [s for i, s in enumerate(sequences) if i not in removed]
    assert trie_counts(trie) == substring_counts(kept, depth)
    assert trie.nodes == len(trie_counts(trie))


def test_match_finds_the_longest_suffix_with_a_continuation():
    trie = SuffixTrie(max_depth=8)
    trie.add([1, 2, 3, 4, 9, 9, 2, 3, 5])
    node, length = trie.match([7, 1, 2, 3])
    assert length == 3 and sorted(node[CHILDREN]) == [4]  # "1 2 3" -> 4 beats "2 3" -> {4, 5}
    assert trie.match([6, 6])[0] is None


def test_speculation_respects_probability_and_depth():
    trie = SuffixTrie(max_depth=8)
    for _ in range(9):
        trie.add([1, 2, 3, 4])
    trie.add([1, 7])
    node, _ = trie.match([1])
    tree, scores = speculate(node, max_nodes=10, max_depth=2, min_token_prob=0.2)
    assert tree.tokens == [2, 3] and scores == pytest.approx([0.9, 0.9])  # 7 (0.1) is below 0.2; depth stops at 2


def test_global_outputs_keep_the_newest_requests_only():
    outputs = GlobalOutputs(max_depth=4, max_requests=2)
    for seq in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        outputs.add(seq)
    assert trie_counts(outputs.trie) == substring_counts([[4, 5, 6], [7, 8, 9]], 4)


# -- lossless on both models ---------------------------------------------------------------------
def prompts_of(spec_bench_questions, lm, n: int) -> list[list[int]]:
    by_category: dict[str, str] = {}
    for q in spec_bench_questions:
        by_category.setdefault(q["category"], q["turns"][0])
    picked = list(by_category.values())
    random.Random(0).shuffle(picked)
    return [format_prompt(lm.tokenizer, p) for p in picked[:n]]


MATRIX_AND_SUFFIX = ("token-recycling", "suffix")


@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_identical_to_plain_decoding_with_drafts_accepted(model_name, request, spec_bench_questions):
    lm = request.getfixturevalue(model_name)
    accepted = Counter()
    for ids in prompts_of(spec_bench_questions, lm, 4):
        ref = specprobe.generate(lm.model, lm.tokenizer, ids, method="ar", max_new_tokens=NEW_TOKENS)
        for method in MATRIX_AND_SUFFIX:
            out = specprobe.generate(lm.model, lm.tokenizer, ids, method=method, max_new_tokens=NEW_TOKENS)
            assert out.token_ids == ref.token_ids, method
            accepted[method] += out.stats.new_tokens - out.stats.target_forwards
    for method in MATRIX_AND_SUFFIX:
        assert accepted[method] > 10, f"{method}: {accepted[method]} drafted tokens accepted in 4 prompts"


def test_suffix_learns_from_earlier_outputs(smollm2):
    """The global trie: the same request again drafts from its own earlier answer."""
    prompt = "Name three uses of a paperclip, one per line."
    options = dict(method="suffix", max_new_tokens=NEW_TOKENS, budget=12, max_spec_factor=4.0)
    first = specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, **options)
    second = specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, **options)
    assert second.token_ids == first.token_ids
    assert second.stats.tau > max(2.0, first.stats.tau)


def test_forget_outputs_drops_only_what_was_learned_from_outputs(smollm2):
    """What scripts/batched.py calls before each run: the suffix tries and adjacency matrices the
    three methods filled go; what else the target keeps (the hybrid's chain calibration) stays."""
    state = specprobe.api.target_of(smollm2.model).drafter_state()
    for method in ("suffix", "token-recycling", "hybrid"):
        specprobe.generate(smollm2.model, smollm2.tokenizer, "Count from one to five.", method=method, max_new_tokens=4)
    learned = {k for k in state if k[0] in (OUTPUTS_KEY, MATRIX_KEY)}
    assert {k[0] for k in learned} == {OUTPUTS_KEY, MATRIX_KEY} and any(k[1] == "hybrid" for k in learned)
    kept = {k: v for k, v in state.items() if k not in learned}
    assert any(k[0] == "chain-calibration" for k in kept)
    forget_outputs(state)
    assert state == kept and all(state[k] is v for k, v in kept.items())


def test_token_recycling_state_file(smollm2, tmp_path):
    path = tmp_path / "matrix.pt"
    out = specprobe.generate(smollm2.model, smollm2.tokenizer, "Count from one to ten.", method="token-recycling", max_new_tokens=16, state_file=str(path))
    saved = AdjacencyMatrix.load(path, smollm2.model.config.vocab_size, 8)
    live = specprobe.api.target_of(smollm2.model).drafter_state()[("adjacency-matrix", "token-recycling", 8, str(path))]
    assert torch.equal(saved.ids, live.ids) and torch.equal(saved.probs, live.probs)
    seen = set(out.prompt_ids[-1:] + out.token_ids[:-1])  # input rows of the generation (drafted nodes were rows too)
    assert all(saved.ids[t, 0] >= 0 for t in seen) and int((saved.ids[:, 0] >= 0).sum()) >= len(seen)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(InvalidOptionError, match="cannot read"):
        specprobe.generate(smollm2.model, smollm2.tokenizer, "Hi", method="token-recycling", max_new_tokens=4, state_file=str(corrupt))
