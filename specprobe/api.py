"""The Python API: `generate(model, tokenizer, prompt, method=...)`, and `prepare`, which does a
method's one-time work (kernel plans, the cost curve, weight copies) before anything is timed."""

from __future__ import annotations

import sys
import time
from typing import Callable

from .backends import backend_for
from .drafters import DEFAULT_METHOD, make_drafter
from .engine.decode import Generation, GenerationResult, decode
from .engine.protocol import Backend
from .engine.sampling import SamplingConfig
from .errors import InvalidOptionError
from .models import format_prompt
from .tuned import tuned_options


def target_of(model) -> Backend:
    """The backend that runs `model` (built once per model, kept by the model)."""
    return backend_for(model)


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
    method: str = DEFAULT_METHOD,
    max_new_tokens: int = 128,
    *,
    chat: bool | None = None,
    on_tokens: Callable[[list[int]], bool | None] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    **options,
) -> GenerationResult:
    """Generate with a speculative `method`; the tokens equal plain decoding's (greedy: the same
    tokens; sampling: the same distribution, and with a seed the same text).

    prompt: a string (formatted with the chat template, or the plain template, see
    `specprobe.models`), a list of chat messages, or a list of token ids.
    options: the method's options (for ESP: masks, branching, budget, mask_init, ema_lambda). For esp
    and hybrid, options not given come from `specprobe tune`'s saved choice for this model, if any.
    on_tokens: called with each step's newly committed token ids (for streaming); returning True
    ends the generation there (stop reason "stop").
    temperature, top_p, top_k, seed: sampling as in transformers' `generate` (temperature 0, the
    default, is greedy). Sampled tokens follow the target's own distribution exactly, whatever the
    method (engine/sampling.py); the same seed on the same machine gives the same output.
    """
    target, prompt_ids, drafter, sampling = _request(model, tokenizer, prompt, method, max_new_tokens, chat, temperature, top_p, top_k, seed, options)
    ids, stats, stop = decode(target, prompt_ids, drafter, max_new_tokens, eos_token_ids(model, tokenizer), on_tokens, sampling, tokenizer)
    return result_of(tokenizer, (ids, stats, stop), prompt_ids, method)


def _request(model, tokenizer, prompt, method, max_new_tokens, chat, temperature, top_p, top_k, seed, options):
    """(target, prompt ids, drafter, sampling) of one request, its options checked."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InvalidOptionError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    sampling = SamplingConfig(temperature, top_p, top_k, seed)
    tuned = tuned_options(model, method)  # `specprobe tune`'s choice for this model, if it ran
    drafter = make_drafter(method, **{**tuned, **{k: v for k, v in options.items() if v is not None}})
    return target_of(model), format_prompt(tokenizer, prompt, chat), drafter, sampling


def new_generation(
    model, tokenizer, prompt, method: str = DEFAULT_METHOD, max_new_tokens: int = 128, *, chat: bool | None = None,
    on_tokens: Callable[[list[int]], bool | None] | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
    seed: int | None = None, **options,
) -> Generation:
    """`generate`'s request as a `Generation` to step side by side with others (engine/batch.py:
    `Batcher(target_of(model), max_batch).submit(lambda: new_generation(...))`); its tokens are
    those `generate` gives. `result_of` turns what it ends with into a GenerationResult."""
    target, prompt_ids, drafter, sampling = _request(model, tokenizer, prompt, method, max_new_tokens, chat, temperature, top_p, top_k, seed, options)
    return Generation(target, prompt_ids, drafter, max_new_tokens, eos_token_ids(model, tokenizer), on_tokens, sampling, tokenizer)


def result_of(tokenizer, ended: tuple, prompt_ids: list[int], method: str) -> GenerationResult:
    """A GenerationResult from (new ids, stats, stop reason)."""
    ids, stats, stop = ended
    return GenerationResult(tokenizer.decode(ids, skip_special_tokens=True), ids, prompt_ids, stats, stop, method)


WARMUP_PROMPT = "Say hello."  # not a benchmark question: a drafter that learns online (omnidraft) must not see one early
WARMUP_TOKENS = 8
USES_COST_CURVE = ("esp", "hybrid", "eagle", "confu")  # methods whose --budget auto reads the cost curve


def _stderr(line: str) -> None:
    print(f"specprobe: {line}", file=sys.stderr, flush=True)


def prepare(
    model, tokenizer, methods: list[str], options: dict[str, dict] | None = None, log: Callable[[str], None] | None = _stderr, warm_up: bool = True
) -> float:
    """Do now, before anything is timed, the one-time work the first generation of each method
    would otherwise pay for: the backend of the model with its kernel plans and weight copies
    (backends/torch/kernels.py), the cost curve that `--budget auto` reads (measured once per
    machine and saved), and a short warm-up generation of each method (ESP's vocabulary
    statistics, first calls' allocations; `warm_up=False` leaves it to the caller). Each piece that
    took time is announced through `log` with its duration. Returns the seconds spent."""
    log = log or (lambda line: None)
    options = options or {}
    start = time.perf_counter()
    target = target_of(model)
    took = time.perf_counter() - start
    if took > 0.5:
        log(f"preparing the engine for this model (kernel plans, weight copies): {took:.1f} s")
    if any(m in USES_COST_CURVE for m in methods):
        t0 = time.perf_counter()
        target.cost_curve()
        if time.perf_counter() - t0 > 0.5:
            log(f"measuring this machine's cost curve once: {time.perf_counter() - t0:.1f} s")
    if warm_up and methods:
        t0 = time.perf_counter()
        for m in dict.fromkeys(methods):
            generate(model, tokenizer, WARMUP_PROMPT, method=m, max_new_tokens=WARMUP_TOKENS, **options.get(m, {}))
        log(f"warm-up of {', '.join(dict.fromkeys(methods))}: {time.perf_counter() - t0:.1f} s")
    return time.perf_counter() - start
