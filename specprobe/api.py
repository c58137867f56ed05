"""The Python API: `generate(model, tokenizer, prompt, method=...)`."""

from __future__ import annotations

import time
from typing import Callable

from .decode import GenerationResult, decode
from .drafters import make_drafter
from .errors import InvalidOptionError
from .models import format_prompt
from .sampling import SamplingConfig
from .tune import tuned_options
from .verify import Target


def eos_token_ids(model, tokenizer) -> set[int]:
    """The ids that end generation, as `model.generate` sees them."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def generate(
    model,
    tokenizer,
    prompt,
    method: str = "esp",
    max_new_tokens: int = 128,
    *,
    chat: bool | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    **options,
) -> GenerationResult:
    """Generate greedily with a speculative `method`; the tokens equal plain greedy decoding.

    prompt: a string (formatted with the chat template, or the plain template, see
    `specprobe.models`), a list of chat messages, or a list of token ids.
    options: the method's options (for ESP: masks, branching, budget, mask_init, ema_lambda). For esp
    and hybrid, options not given come from `specprobe tune`'s saved choice for this model, if any.
    on_tokens: called with each step's newly committed token ids (for streaming).
    temperature, top_p, top_k, seed: sampling as in transformers' `generate` (temperature 0, the
    default, is greedy). Sampled tokens follow the target's own distribution exactly, whatever the
    method (sampling.py); the same seed on the same machine gives the same output.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidOptionError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    sampling = SamplingConfig(temperature, top_p, top_k, seed)
    tuned = tuned_options(model, method)  # `specprobe tune`'s choice for this model, if it ran
    drafter = make_drafter(method, **{**tuned, **{k: v for k, v in options.items() if v is not None}})
    prompt_ids = format_prompt(tokenizer, prompt, chat)
    target = Target.of(model)
    drafter.set_tokenizer(tokenizer)
    ids, stats, stop = decode(target, prompt_ids, drafter, max_new_tokens, eos_token_ids(model, tokenizer), on_tokens, sampling)
    t0 = time.perf_counter()
    drafter.finish()  # e.g. omnidraft's online distillation: its time counts in the request's wall time
    stats.adapt_time = time.perf_counter() - t0
    stats.wall_time += stats.adapt_time
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return GenerationResult(text, ids, prompt_ids, stats, stop, method)
