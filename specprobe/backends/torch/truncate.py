"""A layer-skip draft model: the first N decoder layers of a causal LM, then its norm and head.

Self-speculative decoding (Draft & Verify, Zhang et al. 2023, arXiv 2309.08168; LayerSkip, Elhoushi
et al. 2024, arXiv 2404.16710) drafts with part of the target itself: the same tokenizer, no
second model in memory.
"""

from __future__ import annotations

import copy

import torch

from ...errors import InvalidOptionError


def truncated_model(model, n_layers: int):
    """A NEW causal LM made of the first `n_layers` decoder layers of `model`, then its final norm
    and LM head: a layer-skip ("self-speculative") draft model with the target's own tokenizer.

    Nothing is copied: the new model's modules ARE the original's (embedding, first layers,
    norm, rotary embedding, LM head), so it costs no memory and follows any change to the weights.
    Only the config is new: `num_hidden_layers = n_layers` and `layer_types` cut to the first
    n_layers entries (Gemma 3 interleaves sliding and full layers; its forward reads both).
    Works for models laid out like transformers' Llama/Gemma/Qwen/Mistral (`<base>.layers`,
    `.norm`, `lm_head`); the layers keep their `layer_idx`, so the KV cache indexing is unchanged.
    """
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        raise InvalidOptionError(f"truncated_model: {type(model).__name__} has no <base>.layers / lm_head layout")
    total = len(layers)
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or not 1 <= n_layers <= total:
        raise InvalidOptionError(f"truncated_model: n_layers must be an integer in [1, {total}], got {n_layers!r}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[:n_layers])
    with torch.device("meta"):  # the skeleton only: every module is replaced below
        new = type(model)(config)
    new_base = getattr(new, model.base_model_prefix)
    for name, child in base.named_children():
        setattr(new_base, name, torch.nn.ModuleList(layers[:n_layers]) if name == "layers" else child)
    new.lm_head = model.lm_head
    new.generation_config = copy.deepcopy(model.generation_config)
    leftovers = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
    if leftovers:  # a module this function does not know about
        raise InvalidOptionError(f"truncated_model: {type(model).__name__} has unshared parts: {', '.join(leftovers)}")
    return new.eval()
