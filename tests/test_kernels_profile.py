"""Kernel plans (kernels.py), the reduced head and its vocabulary (draft_vocab.py), `specprobe profile`
and `specprobe tune`."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

import specprobe
from specprobe import api, tune, tuned
from specprobe.backends.torch import TorchBackend, draft_vocab, kernels
from specprobe.backends.torch.kernels import MEASURED_Q, WEIGHT_COPIES, LMHead, Piece, PlannedLinear, head_kernels, plan_rows, project
from specprobe.backends.torch.kv_cache import new_cache
from specprobe.backends.torch.profile import profile
from specprobe.commands.main import main
from specprobe.engine.tree import ROOT, DraftTree
from specprobe.models import format_prompt


@pytest.mark.parametrize("module", [kernels, draft_vocab])
def test_docstring_examples(module):
    failed, attempted = doctest.testmod(module)
    assert attempted > 0 and failed == 0


def test_plans_cover_every_row_once():
    costs = {(k, q): (q if k == "linear" else 3.0 + 0.5 * q) for k in ("linear", "mm") for q in (1, 2, 4, 8, 16)}
    plan = plan_rows(costs, 16)
    for q in range(1, 17):
        pieces = plan[q]
        assert sum(p.rows for p in pieces) == q
        assert all(p.run_as >= p.rows for p in pieces)


# The plans compute the same dot products in another order: equal up to float32 rounding.
HAND_PLAN = {
    1: [Piece(1, 2, "mm")],
    3: [Piece(3, 4, "mm")],
    5: [Piece(2, 2, "mm"), Piece(3, 3, "linear")],
    8: [Piece(4, 4, "mm"), Piece(4, 4, "mm")],
}


@pytest.mark.parametrize("q", sorted(HAND_PLAN) + [6])  # 6: no plan, F.linear
def test_project_equals_linear(q):
    gen = torch.Generator().manual_seed(q)
    w, h = torch.randn(300, 64, generator=gen), torch.randn(q, 64, generator=gen)
    ref = F.linear(h, w)
    out = project(w, h, HAND_PLAN)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


COPY_KERNELS = [k for k in head_kernels() if k in WEIGHT_COPIES]  # vm, and packed where oneDNN runs


@pytest.mark.parametrize("copy", COPY_KERNELS)
def test_copy_kernels_and_the_heads_copy(copy):
    """`vm` (row times the transposed weight) and `packed` (oneDNN's blocked layout) give the same
    logits as F.linear for one and several rows; the copy follows in-place edits of the weight."""
    gen = torch.Generator().manual_seed(1)
    w, h = torch.randn(500, 64, generator=gen), torch.randn(1, 64, generator=gen)
    plan = {1: [Piece(1, 1, copy)], 3: [Piece(3, 4, "mm")], 5: [Piece(5, 8, copy)]}
    torch.testing.assert_close(project(w, h, plan, WEIGHT_COPIES[copy](w)), F.linear(h, w), rtol=1e-5, atol=1e-5)
    head = LMHead(w, softcap=None, plan=plan, copy=copy)
    assert head.copy is not None and head.weight is w
    torch.testing.assert_close(head(h), F.linear(h, w), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        w[7] += 1.0  # e.g. a user editing the model after the engine first saw it
    torch.testing.assert_close(head(h), F.linear(h, w), rtol=1e-5, atol=1e-5)
    for q in (3, 5):
        hq = torch.randn(q, 64, generator=gen)
        torch.testing.assert_close(head(hq), F.linear(hq, w), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # a weight made under inference mode (EAGLE's vocabulary head) has no version counter
        w_inf = w * 1.0
        head_inf = LMHead(w_inf, softcap=None, plan=plan, copy=copy)
        torch.testing.assert_close(head_inf(h), F.linear(h, w_inf), rtol=1e-5, atol=1e-5)
    h_grad = torch.randn(5, 64, generator=gen, requires_grad=True)  # training through the head: autograd's kernel
    head(h_grad).sum().backward()
    torch.testing.assert_close(h_grad.grad, w.sum(0).expand(5, -1), rtol=1e-4, atol=1e-4)
    w_trained = w.clone().requires_grad_(True)  # ... and to the weight, which a copy would not carry
    LMHead(w_trained, softcap=None, plan=plan, copy=copy)(h_grad.detach()).sum().backward()
    torch.testing.assert_close(w_trained.grad, h_grad.detach().sum(0).expand(500, -1), rtol=1e-4, atol=1e-4)


def test_head_plan_keeps_one_copy_only_where_it_pays(monkeypatch):
    """With made-up costs: a copy kernel 40 % cheaper everywhere is kept; of two, the cheaper sum
    over COPY_QS wins; one that saves under 15 % is not kept (its copy would double the memory)."""
    def costs_with(vm: float, packed: float):
        base = {("linear", q): 10.0 * q for q in MEASURED_Q} | {("mm", q): 6.0 + q for q in MEASURED_Q}
        return base | {("vm", q): vm * (6.0 + q) for q in MEASURED_Q} | {("packed", q): packed * (6.0 + q) for q in MEASURED_Q}

    w = torch.zeros(8, 4)
    for (vm, packed), expected in {(0.6, 0.7): "vm", (0.7, 0.6): "packed", (0.9, 0.95): None, (2.0, 0.6): "packed"}.items():
        monkeypatch.setattr(kernels, "load_or_measure_costs", lambda *a, costs=costs_with(vm, packed), **k: costs)
        plan, copy = kernels.head_plan(w)
        assert copy == expected, (vm, packed, copy)
        used = {p.kernel for pieces in plan.values() for p in pieces}
        assert used & set(WEIGHT_COPIES) <= ({copy} if copy else set())


def test_planned_linear_keeps_shapes_and_bias():
    lin = torch.nn.Linear(32, 48, bias=True)
    planned = PlannedLinear(lin, HAND_PLAN)
    for shape in [(1, 5, 32), (1, 1, 32), (2, 4, 32), (1, 70, 32)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(planned(x), lin(x), rtol=1e-5, atol=1e-5)
    assert planned.weight is lin.weight  # shared, not copied


def test_planned_target_agrees_with_transformers_kernels(smollm2):
    """The planned engine's logits equal the F.linear engine's within 1e-3 (same argmax), on a tree."""
    planned, plain = TorchBackend.of(smollm2.model), TorchBackend(smollm2.model, kernels="linear")
    assert planned.decoder is not smollm2.model.get_decoder()  # the user's model is left alone
    assert any(isinstance(m, PlannedLinear) for m in planned.decoder.modules())
    assert not any(isinstance(m, PlannedLinear) for m in smollm2.model.modules())
    ids = format_prompt(smollm2.tokenizer, "Name three colours of the rainbow.")
    tree = DraftTree([100, 200, 300, 400], [ROOT, 0, ROOT, 2])
    outs = []
    for target in (planned, plain):
        cache = new_cache()
        target.forward(cache, ids[:-1], DraftTree())
        outs.append(target.forward(cache, ids[-1:], tree).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-3)
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))


class _Group(torch.nn.Module):
    num_key_value_groups = 3


@pytest.mark.parametrize("q,mask", [(1, None), (1, "additive"), (6, "additive"), (6, "bool"), (6, None)])
def test_grouped_attention_equals_transformers_sdpa(q, mask):
    """Folding a group's query heads into rows attends exactly as repeating the cached keys does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from specprobe.backends.torch.attention import grouped_sdpa

    gen = torch.Generator().manual_seed(q)
    keys = 40
    query = torch.randn(1, 9, q, 16, generator=gen)
    key, value = torch.randn(1, 3, keys, 16, generator=gen), torch.randn(1, 3, keys, 16, generator=gen)
    allowed = torch.rand(q, keys, generator=gen) < 0.6
    allowed[:, 0] = True  # every row sees at least one key
    attn_mask = {None: None, "bool": allowed[None, None], "additive": torch.where(allowed, 0.0, float("-inf"))[None, None]}[mask]
    out, _ = grouped_sdpa(_Group(), query, key, value, attn_mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(_Group(), query, key, value, attn_mask, scaling=0.25)
    assert out.shape == ref.shape == (1, q, 9, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_grouped_attention_is_set_on_the_engine_copy_only(smollm2):
    from specprobe.backends.torch.attention import NAME

    assert TorchBackend.of(smollm2.model).decoder.config._attn_implementation == NAME
    assert smollm2.model.config._attn_implementation == "sdpa"
    assert TorchBackend(smollm2.model, kernels="linear").decoder.config._attn_implementation == "sdpa"


def test_bad_kernels_mode(smollm2):
    with pytest.raises(specprobe.errors.InvalidOptionError):
        TorchBackend(smollm2.model, kernels="fast")


def test_reduced_head_is_the_full_head_restricted():
    gen = torch.Generator().manual_seed(0)
    w, h = torch.randn(1000, 32, generator=gen), torch.randn(3, 32, generator=gen)
    head = LMHead(w, softcap=30.0)
    full = head(h)
    keep = list(range(0, 1000, 3))
    head.set_reduced_vocabulary(keep)
    reduced = head.reduced(h)
    assert reduced.shape == full.shape
    torch.testing.assert_close(reduced[:, keep], full[:, keep], rtol=1e-5, atol=1e-5)
    outside = torch.ones(1000, dtype=torch.bool)
    outside[keep] = False
    assert torch.isinf(reduced[:, outside]).all()
    # its top candidates are the full head's best among the kept tokens: a subset of the vocabulary
    for row in range(3):
        top = reduced[row].topk(5).indices.tolist()
        assert set(top) <= set(keep)
        best_kept = sorted(keep, key=lambda t: -full[row, t].item())[:5]
        assert top == best_kept
    head.set_reduced_vocabulary(None)
    torch.testing.assert_close(head.reduced(h), full)


def test_reduced_head_is_used_only_where_the_measured_costs_say_it_pays():
    w = torch.randn(8000, 16)
    # a head whose cost grows with the rows (like Gemma3's at 8+ rows) and whose reduced part is 1/80 of it
    costs = {"plan": {q: 0.030 + 0.004 * q for q in range(1, 65)}, "mm": {q: 0.030 + 0.004 * q for q in (1, 2, 4, 8, 16, 32, 64)}}
    head = LMHead(w, costs=costs)
    assert not head.reduced_pays(2, 28)  # no reduced vocabulary yet
    head.set_reduced_vocabulary(list(range(100)))
    assert head.reduced_pays(2, 28)  # 0.038 + 0.158 / 80 + fill < 0.85 x 0.150
    assert not head.reduced_pays(2, 1)  # one draft row: 0.038 + ... is not 15 % under 0.042
    assert not head.reduced_pays(2, 0)
    assert not head.reduced_pays(40, 40)  # 80 rows: beyond the measured plans
    assert not LMHead(w).reduced_pays(2, 28)  # no measured costs (off the CPU, or kernels="linear")


def test_token_frequencies_rank_the_seen_tokens_first_and_rebuild_on_growth_only():
    f = draft_vocab.TokenFrequencies(vocab_size=64)  # 8 tokens
    assert not f.observe(list(range(50, 60)))  # 10 distinct: fewer than MIN_TOKENS, no vocabulary yet
    assert f.observe([33] * 5 + list(range(40, 50)))  # 21 distinct: the first build
    assert f.top() == [33, 40, 41, 42, 43, 44, 45, 46]  # the most frequent, then ties by id
    assert not f.observe([40, 41])  # nothing new
    assert f.observe(list(range(60, 64)) + [5])  # 26 distinct: grown by 10 % or more
    assert f.top()[:3] == [33, 40, 41]
    assert not f.observe([-1, 64, 1000])  # ids outside the vocabulary are ignored
    assert f.counts.sum() == 32 and f.distinct == 26
    unseen = draft_vocab.TokenFrequencies(vocab_size=64)
    assert unseen.top() == list(range(8))  # nothing seen: the first ids


@pytest.mark.parametrize("method", ["lookahead", "esp"])
def test_reduced_head_drafts_keep_the_output_identical(smollm2, monkeypatch, method):
    """Draft-only rows scored on a small vocabulary (forced here, whatever this machine's costs):
    drafts change, the emitted tokens do not."""
    prompt = "List the first ten prime numbers, separated by commas."
    ref = specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, method="ar", max_new_tokens=32)
    target = TorchBackend.of(smollm2.model)
    calls = []
    reduced = target.head.reduced
    monkeypatch.setattr(target.head, "reduced_pays", lambda n_full, n_draft, n_reduced=None: n_draft > 0)
    monkeypatch.setattr(target.head, "reduced", lambda h: calls.append(h.shape[0]) or reduced(h))
    monkeypatch.setattr(target.head, "reduced_ids", None)
    monkeypatch.setattr(target.head, "reduced_weight", None)
    target.learning_scope(f"reduced-head-test-{method}")  # token counts of its own, from nothing
    try:
        out = specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, method=method, max_new_tokens=32)
    finally:
        target.learning_scope("default")
    assert out.token_ids == ref.token_ids
    assert calls and target.head.reduced_weight.shape[0] == target.vocab_size // draft_vocab.MAX_FRACTION


# -- profile ---------------------------------------------------------------------------------------
def test_profile_parts_and_roofline(smollm2):
    prof = profile(TorchBackend.of(smollm2.model), "smollm2-135m", qs=(1, 4), context=64, repeats=1)
    assert [r.q for r in prof.rows] == [1, 4]
    assert prof.machine.bandwidth_gbs > 0 and prof.machine.peak_gflops > 0
    assert 4e8 < prof.weight_bytes < 7e8  # 135M float32 parameters, the input table left out
    for r in prof.rows:
        assert r.total_ms > 0 and r.layers_ms > 0 and r.head_ms > 0 and r.bound_ms > 0
    md = prof.to_markdown()
    assert "roofline" in md and "| 4 |" in md


@pytest.mark.parametrize("argv", [["profile", "--q", "0"], ["profile", "--q", "1000"]])
def test_profile_cli_rejects_bad_q(argv, capsys):
    assert main(argv) == 2
    assert "--q" in capsys.readouterr().err


# -- tune -------------------------------------------------------------------------------------------
def test_tune_saves_a_choice_that_generate_uses(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECPROBE_SETTINGS", str(tmp_path / "tuned"))
    assert tuned.tuned_options(smollm2.model, "esp") == {}
    grid = tune.candidates(["vocab-mean", "gaussian"], [1], [2])
    chosen, trials = tune.tune(smollm2, tune.PROMPTS[:1], grid, max_new_tokens=8)
    assert len(trials) == 2 and all(t.identical for t in trials)
    assert chosen in [{k: g[k] for k in tuned.TUNED_KEYS} for g in grid]
    tune.save(smollm2.model, chosen, trials, {})
    assert tuned.tuned_options(smollm2.model, "esp") == chosen
    assert tuned.tuned_options(smollm2.model, "pld") == {}
    seen = {}
    real = api.make_drafter

    def spy(method, **options):
        seen.update(options)
        return real(method, **options)

    monkeypatch.setattr(api, "make_drafter", spy)
    specprobe.generate(smollm2.model, smollm2.tokenizer, "Hi", method="esp", max_new_tokens=2, branching=3)
    assert seen["mask_init"] == chosen["mask_init"] and seen["branching"] == 3  # the caller's option wins
    assert "| vocab-mean" in tune.to_markdown(trials, chosen)


def test_tune_cli_rejects_missing_prompt_file(capsys):
    assert main(["tune", "--prompt-file", "/nonexistent/prompts.txt"]) == 2
    assert "prompt-file" in capsys.readouterr().err
