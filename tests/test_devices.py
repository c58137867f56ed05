"""Every greedy method on tiny random models, on the CPU and on CUDA where there is one.

The built-in models are too big to ship to a GPU machine in every test run; these two tiny models
(random weights, the real architectures) exercise the same code on any device: tensors made on the
CPU (masks, mask vectors, cache indices) must reach the model's device. The Gemma3 one has a
16-token sliding window, so the prompt and the drafts cross it, and Gemma3-270M's attention shape
(one key/value head for four query heads, head_dim 256), the shape of the CUDA defect that
scripts/cuda_sdpa_check.py measures.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import specprobe
from specprobe.api import generate
from specprobe.backends.torch import TorchBackend
from specprobe.backends.torch.attention import NAME as GROUPED
from specprobe.backends.torch.kv_cache import new_cache
from specprobe.drafters.ngram import build_trie
from specprobe.engine.tree import DraftTree

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# repeats, so that prompt lookup and the hybrid have something to copy; 19 tokens > the window
PROMPT = [1, 5, 9, 33, 7, 5, 9, 33, 7, 5, 9, 33, 100, 200, 300, 5, 9, 33, 7]
NEW_TOKENS = 40


def tiny_model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=4, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=True, **common))
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    cfg = Gemma3TextConfig(num_hidden_layers=3, num_key_value_heads=1, head_dim=256, sliding_window=16, layer_types=layer_types, pad_token_id=0, **common)
    return Gemma3ForCausalLM(cfg)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_dir(request, tmp_path_factory, smollm2):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tiny_model(request.param).save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)  # any tokenizer of the same vocabulary size
    return path


@pytest.mark.parametrize("device", DEVICES)
def test_every_method_equals_hf_generate_on_tiny_models(tiny_dir, device):
    lm = specprobe.load(str(tiny_dir), device=device)
    ids = torch.tensor([PROMPT], device=device)
    expected = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    expected = expected[0, len(PROMPT) :].tolist()
    cases = [
        ("ar", {}),
        ("esp", {}),  # vocab-mean: a mask vector computed on the CPU
        ("esp", {"mask_init": "context-mean", "masks": 2, "branching": 3, "budget": 12}),
        ("pld", {}),
        ("lookahead", {}),
        ("hybrid", {}),
        ("draft", {"draft_model": lm}),  # the target as its own drafter: every draft is accepted
    ]
    taus = {}
    for method, options in cases:
        out = generate(lm.model, lm.tokenizer, PROMPT, method=method, max_new_tokens=NEW_TOKENS, **options)
        assert out.token_ids == expected, (method, options)
        taus[method] = out.stats.new_tokens / out.stats.target_forwards
    assert taus["draft"] > 2, taus  # trees of several tokens were verified and accepted
    assert str(lm.model.device).startswith(device)


@pytest.mark.parametrize("device", DEVICES)
def test_engine_attention_is_grouped_on_every_device(tiny_dir, device):
    lm = specprobe.load(str(tiny_dir), device=device)
    target = TorchBackend.of(lm.model)
    assert target.decoder is not lm.model.get_decoder()  # the engine's own copy ...
    assert target.decoder.config._attn_implementation == GROUPED  # ... attending without repeat_kv
    assert lm.model.config._attn_implementation == "sdpa"  # the user's model is untouched


@pytest.mark.parametrize("device", DEVICES)
def test_rows_match_single_rows_in_33_row_steps(tiny_dir, device):
    """Steps of 33 rows (the root and 32 nodes: pld's default tree) over 513 and 545 keys, the shape
    in which CUDA's memory-efficient SDPA returned wrong rows for stride-0 keys/values on an H100
    (docs/gpu/h100-sdpa-check.md), as a chain (the model's own masks) and as a tree (the engine's
    masks): the logits of every node on the chain equal those of its tokens fed one at a time."""
    lm = specprobe.load(str(tiny_dir), device=device)
    target = TorchBackend.of(lm.model)
    text = torch.randint(3, 49152, (600,), generator=torch.Generator().manual_seed(1)).tolist()
    for past in (480, 512):  # the step's keys: 480 + 33 = 513 and 512 + 33 = 545
        chain = text[past + 1 : past + 33]
        cache = new_cache()
        target.forward(cache, text[:past], DraftTree())
        reference = [target.forward(cache, [t], DraftTree()).logits[0] for t in [text[past], *chain]]
        branches = [chain[:20] + [7, 8], chain[:5] + [9] * 10]  # 22 + 10 more nodes: 32 in all
        for tree in (DraftTree.chain(chain), build_trie([chain[:20], *branches], budget=32)):
            assert len(tree) == 32
            cache = new_cache()
            target.forward(cache, text[:past], DraftTree())
            out = target.forward(cache, [text[past]], tree)
            torch.testing.assert_close(out.logits[0], reference[0], rtol=1e-4, atol=1e-4)
            for node in range(len(tree)):
                path = [tree.tokens[n] for n in tree.path_to(node)]
                if path == chain[: len(path)]:
                    torch.testing.assert_close(out.logits[1 + node], reference[len(path)], rtol=1e-4, atol=1e-4)
