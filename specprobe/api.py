"""The Python API: `generate(model, tokenizer, prompt, method=...)`."""

from __future__ import annotations

from typing import Callable

from .decode import GenerationResult, decode
from .drafters import make_drafter
from .errors import InvalidOptionError
from .models import format_prompt
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
    **options,
) -> GenerationResult:
    """Generate greedily with a speculative `method`; the tokens equal plain greedy decoding.

    prompt: a string (formatted with the chat template, or the plain template, see
    `specprobe.models`), a list of chat messages, or a list of token ids.
    options: the method's options (for ESP: masks, top_k, budget, mask_init, ema_lambda).
    on_tokens: called with each step's newly committed token ids (for streaming).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidOptionError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    drafter = make_drafter(method, **options)
    prompt_ids = format_prompt(tokenizer, prompt, chat)
    target = Target.of(model)
    ids, stats, stop = decode(target, prompt_ids, drafter, max_new_tokens, eos_token_ids(model, tokenizer), on_tokens)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return GenerationResult(text, ids, prompt_ids, stats, stop, method)
