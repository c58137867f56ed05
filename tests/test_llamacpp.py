"""The llama.cpp backend: the same engine and drafters on a GGUF file run by llama.cpp.

Lossless here means: every method's tokens equal the backend's own plain decoding (`ar`), and
`ar` equals llama-cpp-python's own greedy generation on the same prompt tokens; on both built-in
models, over Spec-Bench prompts of several categories (one longer than llama.cpp's 512-token batch,
and Gemma3 past its 512-token sliding window), with drafts accepted (asserted).
"""

from __future__ import annotations

import random

import pytest
import torch

import specprobe
from conftest import varied_prompts
from specprobe.backends.llamacpp.sequences import assign_sequences
from specprobe.bench.llamacpp_rows import llamacpp_turn, reference_llama
from specprobe.engine.tree import AuxRows, DraftTree, Layout, rows_structure
from specprobe.errors import InvalidOptionError, ModelNotFoundError
from specprobe.models import format_prompt

N_TOKENS = 48


@pytest.fixture(scope="session")
def gemma3_cpp():
    return specprobe.load("gemma3-270m", backend="llamacpp")


def long_prompt(questions: list[dict], tokenizer, at_least: int) -> list[int]:
    """The first Spec-Bench prompt (rag, summarization) of at least `at_least` tokens."""
    for q in questions:
        if q["category"] in ("rag", "summarization"):
            ids = format_prompt(tokenizer, [{"role": "user", "content": q["turns"][0]}])
            if len(ids) >= at_least:
                return ids
    raise AssertionError(f"no prompt of {at_least} tokens")


def test_a_gguf_file_is_parsed_once_while_it_is_converted():
    """transformers asks for a GGUF reader three times while converting; one parse serves them all."""
    import gguf

    from specprobe.models import _one_gguf_reader, gguf_path

    path = str(gguf_path("smollm2-135m"))
    original = gguf.GGUFReader
    with _one_gguf_reader():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is first and "general.architecture" in first.fields
    assert gguf.GGUFReader is original and original(path) is not first


# -- sequences: a tree as sequence sets ---------------------------------------------------------
def random_layout(rng: random.Random) -> Layout:
    tree = DraftTree()
    for _ in range(rng.randint(1, 12)):
        tree.add(rng.randint(0, 99), rng.randint(-1, len(tree) - 1))
    anchors = [rng.randint(-1, len(tree) - 1) for _ in range(rng.randint(0, 5))]
    aux = AuxRows(torch.zeros(len(anchors), 4), anchors, [1] * len(anchors), [()] * len(anchors)) if anchors else None
    return Layout.of(1, tree, aux)


@pytest.mark.parametrize("seed", range(20))
def test_sequence_sets_give_every_row_exactly_its_visible_rows(seed):
    """A row sees the rows that carry its view (first) sequence at positions up to its own: that
    must be its visible set, whatever the tree; and each sequence's positions run consecutively."""
    layout = random_layout(random.Random(seed))
    visible, offsets = rows_structure(layout)
    positions = (offsets + 100).tolist()
    sets = assign_sequences(visible.tolist(), positions, layout.n_pending)
    q = len(positions)
    for r in range(q):
        view = sets.rows[r][0]
        seen = {c for c in range(q) if view in sets.rows[c] and positions[c] <= positions[r]}
        assert seen == {c for c in range(q) if visible[r][c]}, (r, sets.rows)
    for s in range(sets.n_branches + 1):
        carried = sorted(positions[c] for c in range(q) if s in sets.rows[c])
        assert carried == list(range(carried[0], carried[0] + len(carried))), (s, carried)


# -- lossless on both models ---------------------------------------------------------------------
METHODS = ["pld", "hybrid", "esp", "lookahead", "token-recycling", "suffix"]


@pytest.mark.parametrize("model_name", ["smollm2_cpp", "gemma3_cpp"])
def test_every_method_equals_the_backends_plain_decoding(model_name, request, spec_bench_questions):
    """Each method on a prompt of its own category (six categories in all) on both models, and on
    one long prompt on one of the two (half the methods each)."""
    lm = request.getfixturevalue(model_name)
    short = [format_prompt(lm.tokenizer, p) for p in varied_prompts(spec_bench_questions, len(METHODS))]
    long = long_prompt(spec_bench_questions, lm.tokenizer, 600)  # past one 512-token batch (and Gemma3's window)
    plain = lambda ids: specprobe.generate(lm.model, lm.tokenizer, ids, method="ar", max_new_tokens=N_TOKENS).token_ids
    long_ref, accepted = plain(long), 0
    half = ["smollm2_cpp", "gemma3_cpp"].index(model_name)
    for k, (method, ids) in enumerate(zip(METHODS, short)):
        for prompt, ref in ((ids, plain(ids)), (long, long_ref))[: 2 if k % 2 == half else 1]:
            out = specprobe.generate(lm.model, lm.tokenizer, prompt, method=method, max_new_tokens=N_TOKENS, **({"budget": 6} if method == "pld" else {}))
            assert out.token_ids == ref, (method, len(prompt))
            accepted += out.stats.new_tokens - out.stats.target_forwards
    assert accepted > 20  # drafts were accepted, not just proposed


@pytest.mark.parametrize("model_name", ["smollm2_cpp", "gemma3_cpp"])
def test_plain_decoding_equals_llama_cpp_pythons_own_greedy(model_name, request, spec_bench_questions):
    lm = request.getfixturevalue(model_name)
    llm = reference_llama(lm.model.path, lm.model.max_length, lm.model.threads, lookup=False)
    for prompt in varied_prompts(spec_bench_questions, 3):
        messages = [{"role": "user", "content": prompt}]
        ours = specprobe.generate(lm.model, lm.tokenizer, messages, method="ar", max_new_tokens=N_TOKENS)
        theirs = llamacpp_turn(lm, llm, messages, N_TOKENS)
        assert ours.token_ids == theirs.token_ids


def test_draft_model_and_omnidraft_on_llama_cpp(smollm2_cpp, gemma3_cpp, spec_bench_questions):
    prompt = varied_prompts(spec_bench_questions, 6)[5]
    ref = specprobe.generate(gemma3_cpp.model, gemma3_cpp.tokenizer, prompt, method="ar", max_new_tokens=N_TOKENS)
    frozen = specprobe.generate(gemma3_cpp.model, gemma3_cpp.tokenizer, prompt, method="omnidraft-frozen", max_new_tokens=N_TOKENS, draft_model=smollm2_cpp)
    assert frozen.token_ids == ref.token_ids and frozen.stats.tau > 1.0
    ref = specprobe.generate(smollm2_cpp.model, smollm2_cpp.tokenizer, prompt, method="ar", max_new_tokens=N_TOKENS)
    drafted = specprobe.generate(smollm2_cpp.model, smollm2_cpp.tokenizer, prompt, method="draft", max_new_tokens=N_TOKENS, draft_model=smollm2_cpp, num_tokens=3)
    assert drafted.token_ids == ref.token_ids and drafted.stats.tau > 2.0  # the target as its own drafter: all accepted


def test_sampling_follows_the_seed_like_plain_decoding(smollm2_cpp):
    run = lambda m: specprobe.generate(smollm2_cpp.model, smollm2_cpp.tokenizer, "Tell me about owls.", method=m, max_new_tokens=24, temperature=0.8, top_p=0.9, seed=3).token_ids
    assert run("pld") == run("hybrid") == run("ar")
    assert run("ar") != specprobe.generate(smollm2_cpp.model, smollm2_cpp.tokenizer, "Tell me about owls.", method="ar", max_new_tokens=24, temperature=0.8, top_p=0.9, seed=4).token_ids


def test_clear_errors(smollm2_cpp):
    with pytest.raises(InvalidOptionError, match="hidden states"):
        specprobe.generate(smollm2_cpp.model, smollm2_cpp.tokenizer, "hi", method="eagle", max_new_tokens=2, head=_tiny_head())
    with pytest.raises(ModelNotFoundError, match="GGUF"):
        specprobe.load("HuggingFaceTB/SmolLM2-135M", backend="llamacpp")
    with pytest.raises(InvalidOptionError, match="truncated"):
        specprobe.models.load_draft("truncated:4", smollm2_cpp)
    with pytest.raises(InvalidOptionError, match="unknown llamacpp option"):
        specprobe.load("smollm2-135m", backend="llamacpp", flash=True)
    with pytest.raises(InvalidOptionError, match="torch drafter"):  # adapting needs the drafter's weights
        specprobe.generate(smollm2_cpp.model, smollm2_cpp.tokenizer, "hi", method="omnidraft", max_new_tokens=2, draft_model=smollm2_cpp)


def _tiny_head():
    from specprobe.heads.draft_head import DraftHead, HeadConfig

    return DraftHead(HeadConfig(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=64, vocab_size=49152, feature_layers=(2, 15, 28)))


def test_the_measurements_a_budget_reads(smollm2_cpp):
    backend = specprobe.api.target_of(smollm2_cpp.model)
    assert backend.max_rows() >= 1
    curve = backend.cost_curve()
    assert curve[1] > 0 and curve[64] > curve[1]
