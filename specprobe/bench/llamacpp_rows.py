"""The bench's llama.cpp reference rows: what a llama.cpp user runs today, through llama-cpp-python.

    llamacpp          `Llama(...).generate` greedy (top-k 1), llama-cpp-python's defaults
    llamacpp-lookup   the same with its own prompt-lookup drafting
                      (`draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10)`)

Both load the GGUF file of the bench's model a second time, with llama-cpp-python's own defaults
but for what the llamacpp backend sets too: the context size, the thread count, and no weight
repacking (`use_extra_bufts`, which llama-cpp-python's `Llama` does not expose: its default model
parameters are read with that one field changed), so that the `llamacpp` row computes what the
backend's `ar` computes, token for token (llama.cpp's kernels differ with repacking, and greedy
texts part at near-ties). A generation stops at max_new_tokens or after an end-of-generation
token (kept), as the engine's does; tokens/s counts from the prompt's first token to the last
new token, as for every other row.
"""

from __future__ import annotations

import time

from ..models import format_prompt
from .answers import TurnOutput

LOOKUP_TOKENS = 10


def reference_llama(path, context: int, threads: int, lookup: bool):
    """llama-cpp-python's Llama on `path` (with its prompt-lookup drafter when `lookup`)."""
    from ..backends.llamacpp.library import llama

    llama_cpp = llama()
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS) if lookup else None
    bindings = llama_cpp.llama_cpp  # what llama_cpp.Llama reads its default model parameters from
    defaults = bindings.llama_model_default_params

    def no_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = no_repacking
    try:
        # with a draft model llama-cpp-python keeps every row's logits, but sizes that buffer by
        # `logits_all` (n_batch rows without it): prompts past 512 tokens overflow it (0.3.36).
        # logits_all=True sizes it n_ctx x vocab (4.3 GB for Gemma3's 262k vocabulary at 4096 tokens).
        return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, draft_model=draft,
                               logits_all=lookup, verbose=False)
    finally:
        bindings.llama_model_default_params = defaults


def llamacpp_turn(lm, llm, messages: list[dict], max_new_tokens: int, sampling: dict | None = None) -> TurnOutput:
    """One turn decoded by llama-cpp-python itself (greedy, or its own sampler with the same settings)."""
    import llama_cpp

    prompt_ids = format_prompt(lm.tokenizer, messages)
    sampling = sampling or {}
    if sampling.get("temperature", 0) > 0:
        params = dict(temp=sampling["temperature"], top_p=sampling.get("top_p", 1.0), top_k=sampling.get("top_k", 0) or 0, min_p=0.0, repeat_penalty=1.0)
        if sampling.get("seed") is not None:
            llm.set_seed(int(sampling["seed"]))
    else:
        params = dict(temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    vocab = llm._model.vocab
    new: list[int] = []
    llm.reset()
    # a fresh cache from its first cell, as the llamacpp backend starts every generation: where the
    # cells of a request sit otherwise depends on the request before it (and changes llama.cpp's sums)
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    t0 = time.perf_counter()
    for token in llm.generate(prompt_ids, reset=True, **params):
        new.append(int(token))
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(new) >= max_new_tokens:
            break
    wall = time.perf_counter() - t0
    text = lm.tokenizer.decode(new, skip_special_tokens=True)
    if llm.draft_model is None:  # one forward per token: tau is 1 by definition
        return TurnOutput(text, new, len(new), wall, [1] * len(new))
    return TurnOutput(text, new, None, wall, None)  # its drafting's forwards and accept lengths are not observable
