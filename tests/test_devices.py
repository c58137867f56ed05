"""Every greedy method on tiny random models, on the CPU and on CUDA where there is one.

The built-in models are too big to ship to a GPU machine in every test run; these two tiny models
(random weights, the real architectures) exercise the same code on any device: tensors made on the
CPU (masks, mask vectors, cache indices) must reach the model's device. The Gemma3 one has a
16-token sliding window, so the prompt and the drafts cross it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import specprobe
from specprobe.api import generate

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
    cfg = Gemma3TextConfig(num_hidden_layers=3, num_key_value_heads=1, head_dim=16, sliding_window=16, layer_types=layer_types, pad_token_id=0, **common)
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
