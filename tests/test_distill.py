"""Online distillation (OmniDraft's hybrid loss on a LoRA adapter): the alignment of two
tokenizations, the loss, and the update on a tiny random Llama, which must learn while leaving
the user's model untouched."""

from __future__ import annotations

import doctest

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specprobe.backends.torch import TorchBackend
from specprobe.backends.torch.kv_cache import cache_kwargs, cache_length, new_cache
from specprobe.drafters.omnidraft import distill
from specprobe.drafters.omnidraft.distill import Alignment, DistillConfig, OnlineDistiller, align_for_distillation, hybrid_loss
from specprobe.errors import InvalidOptionError


def test_doctests():
    failed, attempted = doctest.testmod(distill)
    assert failed == 0 and attempted > 0


def test_alignment_skips_tokens_cut_inside_draft_tokens_and_wrong_direct_maps():
    # draft 'ab' 'cd' 'e' (2,2,1); target 'a' 'bcd' 'e' (1,3,1) from byte 0: 'a' and 'bcd' end inside 'ab'
    a = align_for_distillation([0, 1, 2], [2, 2, 1], [5, 6, 7], [1, 3, 1], 0, {2: 7})
    assert a.kl == [(2, 2)] and a.nll == []
    # the same span, but the direct map sends the draft token elsewhere: no KL item
    a = align_for_distillation([0, 1, 2], [2, 2, 1], [5, 6, 7], [1, 3, 1], 0, {2: 9})
    assert a.kl == [] and a.nll == []


def test_hybrid_loss_terms():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0]])
    shared = torch.tensor([0, 1, 2])  # draft ids 0..2 are shared; id 3 is not
    same = torch.log_softmax(logits[0, shared], -1)[None]
    none = torch.tensor([], dtype=torch.long)
    kl_zero = hybrid_loss(logits, torch.tensor([0]), same, shared, none, none)
    assert float(kl_zero) == pytest.approx(0.0, abs=1e-6)
    other = torch.log_softmax(torch.tensor([[0.0, 3.0, 0.0]]), -1)
    assert float(hybrid_loss(logits, torch.tensor([0]), other, shared, none, none)) > 0.5
    nll = hybrid_loss(logits, none, same[:0], shared, torch.tensor([1]), torch.tensor([1]), nll_weight=2.0)
    assert float(nll) == pytest.approx(2.0 * float(torch.nn.functional.cross_entropy(logits[1:], torch.tensor([1]))))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_distiller_learns_and_leaves_the_users_model_alone(tiny):
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
    d = OnlineDistiller(tiny, DistillConfig(rank=4, lr=1e-2, layers=2))
    assert d.params and all("lora_" in n for n in d.params)
    assert all(".layers.2." in n or ".layers.3." in n for n in d.params)  # only the last 2 layers
    ids = torch.randint(0, 48, (1, 12))
    with torch.no_grad():  # LoRA starts at zero: the adapted copy computes what the model does
        assert torch.allclose(d.model(input_ids=ids).logits, tiny(input_ids=ids).logits, atol=1e-5)
    draft_ids = ids[0].tolist()
    shared = torch.arange(40)
    target = torch.log_softmax(torch.randn(12, 40) * 3, -1)
    alignment = Alignment(kl=[(j, j) for j in range(1, 8)], nll=[8, 9, 10, 11])
    # half the sequence comes from a cache computed by the same weights (as the drafter's own cache)
    cache = new_cache()
    with torch.inference_mode():
        d.model(input_ids=ids[:, :5], use_cache=True, **cache_kwargs(d.model, cache))
    assert cache_length(cache) == 5
    backend = TorchBackend.of(tiny)  # the drafter's backend: how the distiller reaches the cache
    losses = [d.update(backend, draft_ids, 5, cache, alignment, target, shared) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0], losses
    with torch.no_grad():  # the drafting twin holds base + LoRA delta
        assert torch.allclose(d.draft_model(input_ids=ids).logits, d.model(input_ids=ids).logits, atol=1e-4)
        assert not torch.allclose(d.draft_model(input_ids=ids).logits, tiny(input_ids=ids).logits, atol=1e-3)
    for n, p in tiny.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n
    state = d.state_dict()
    again = OnlineDistiller(tiny, DistillConfig(rank=4, lr=1e-2, layers=2))
    again.load_state_dict(state, "state.pt")
    with torch.no_grad():
        assert torch.allclose(again.model(input_ids=ids).logits, d.model(input_ids=ids).logits)
    with pytest.raises(InvalidOptionError, match="different drafter"):
        OnlineDistiller(tiny, DistillConfig(rank=2, layers=2)).load_state_dict(state, "state.pt")


def test_nothing_to_learn_is_no_update(tiny):
    d = OnlineDistiller(tiny, DistillConfig(rank=2, layers=1))
    assert d.update(TorchBackend.of(tiny), [1, 2, 3], 0, new_cache(), Alignment(), torch.zeros(0, 4), torch.arange(4)) is None
    assert d.updates == 0


@pytest.mark.parametrize("bad", [{"rank": 0}, {"lr": 0}, {"lr": 2.0}, {"max_tokens": -1}])
def test_bad_distill_options(bad):
    with pytest.raises(InvalidOptionError):
        DistillConfig(**bad)
