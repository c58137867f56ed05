"""`--backend auto`: the backend that runs a method fastest for this model on this machine, measured once.

A GGUF model runs on both backends: torch de-quantises it (float32 rows, often cheap to add many
at once) and llama.cpp runs it quantised (fewer bytes per forward, often the cheaper single row).
Which one gives a method more tokens per second depends on the machine's cost curves and on how
many of the method's drafts the model accepts, so neither is assumed: `choose_backend` loads the
model on both, measures each backend's cost curve (saved as always), and times the method on
`CALIBRATION_PROMPTS` (short prompts of four kinds, not Spec-Bench questions), the backends in an
order rotated per prompt; the one that made more tokens per second wins. Its trials (tokens/s, and
what they are made of: tau and the time per forward) and the choice are saved under `$SPECPROBE_CACHE/backend_choices/`, keyed by the file,
method, options and settings, so later runs read the choice instead of measuring.

No measurement is needed where only one backend can run: a model that is not a GGUF file
(llama.cpp runs GGUF files only), a machine without llama-cpp-python, or a method that needs
hidden states (eagle, confu) all get torch, with the reason.
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .api import generate, prepare
from .backends.llamacpp import library
from .drafters import DEFAULT_METHOD, DRAFT_MODEL_METHODS, METHODS
from .errors import InvalidOptionError
from .models import BUILTIN_MODELS, gguf_path, load
from .store import atomic_write, cache_root, file_name

CHOICE_VERSION = 1  # bumped when either backend's speed changes enough to make saved choices stale
TORCH_ONLY = ("eagle", "confu")  # need the target's hidden states, which llama.cpp does not expose
CALIBRATION_TOKENS = 64
CALIBRATION_PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring and two tests.",
    "Summarize in two sentences: The city council met on Tuesday to discuss the new bicycle lanes. "
    "Supporters said the lanes would make streets safer and cut traffic; shop owners worried about "
    "losing parking in front of their stores. The council agreed to build the lanes on two streets "
    "first and to count cyclists, cars and shop visits for a year before deciding on the rest of the city.",
    "A train travels 120 km in 1.5 hours, then 80 km in 1 hour. What is its average speed over the "
    "whole trip? Show each step.",
)


@dataclass
class BackendTrial:
    """How one backend ran the method on the calibration prompts."""

    backend: str
    tokens_per_s: float  # new tokens / wall time over all calibration prompts
    tau: float  # new tokens per target forward
    ms_per_forward: float  # verification time per target forward (its rows set by the method's budget on this backend's cost curve)


@dataclass
class BackendChoice:
    backend: str
    reason: str  # one line, said to the user
    trials: list[BackendTrial] = field(default_factory=list)
    saved_at: str | None = None  # the file the choice was read from or written to

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackendChoice":
        return cls(d["backend"], d["reason"], [BackendTrial(**t) for t in d.get("trials", [])], d.get("saved_at"))


def pick(trials: list[BackendTrial]) -> BackendChoice:
    """The faster trial's backend; a tie (within 1 %) goes to torch, the default.

    >>> pick([BackendTrial("torch", 35.3, 1.47, 37.0), BackendTrial("llamacpp", 87.0, 1.10, 11.4)]).reason
    "llamacpp: 87.0 tok/s (tau 1.10, 11.4 ms per forward) against torch's 35.3 (tau 1.47, 37.0 ms per forward), 2.46x"
    >>> pick([BackendTrial("torch", 60.0, 4.0, 60.1), BackendTrial("llamacpp", 60.3, 3.1, 45.2)]).backend
    'torch'
    """
    by_speed = sorted(trials, key=lambda t: -t.tokens_per_s)
    best, other = by_speed[0], by_speed[1]
    if best.backend != "torch" and best.tokens_per_s < 1.01 * other.tokens_per_s:
        best, other = other, best
    ratio = best.tokens_per_s / other.tokens_per_s if other.tokens_per_s else float("inf")
    reason = (f"{best.backend}: {best.tokens_per_s:.1f} tok/s (tau {best.tau:.2f}, {best.ms_per_forward:.1f} ms per forward) against "
              f"{other.backend}'s {other.tokens_per_s:.1f} (tau {other.tau:.2f}, {other.ms_per_forward:.1f} ms per forward), {ratio:.2f}x")
    return BackendChoice(best.backend, reason, list(trials))


def only_torch_reason(name: str, method: str) -> str | None:
    """Why `name` can run `method` on the torch backend only, or None if both backends can."""
    if method in TORCH_ONLY:
        return f"torch: {method} needs the target's hidden states, which the llamacpp backend does not expose"
    if method in DRAFT_MODEL_METHODS:
        return f"torch: --backend auto does not time {method}, whose speed depends on its draft model too (name a backend)"
    if name not in BUILTIN_MODELS and not name.endswith(".gguf"):
        return "torch: the llamacpp backend runs GGUF files only"
    if not library.available():
        return "torch: llama-cpp-python is not installed (pip install \"specprobe[llamacpp]\")"
    return None


def _choice_file(name: str, method: str, options: dict, dtype: str, device: str, llamacpp_options: dict) -> Path:
    path = gguf_path(name)
    st = path.stat()
    settings = json.dumps({"method": method, "options": options, "dtype": dtype, "device": device, "llamacpp": llamacpp_options,
                           "torch": torch.__version__, "threads": torch.get_num_threads(), "llama_cpp": library.llama().__version__}, sort_keys=True, default=str)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
    key = f"v{CHOICE_VERSION}-{path.stem}-{st.st_size}-{method}-{digest}"
    return cache_root() / "backend_choices" / (file_name(key) + ".json")


def measure(models: dict, method: str, options: dict, prompts=CALIBRATION_PROMPTS, tokens: int = CALIBRATION_TOKENS,
            log: Callable[[str], None] = lambda line: None) -> list[BackendTrial]:
    """The trials of `method` on `prompts`, one per {backend: LoadedModel}: each model prepared
    first (its cost curve measured or read, a warm-up run), the backends' order rotated per prompt."""
    for lm in models.values():
        prepare(lm.model, lm.tokenizer, [method], {method: options}, log=log)
    runs = {b: [] for b in models}  # backend -> the GenerationStats of each prompt
    for i, prompt in enumerate(prompts):
        for backend in list(models)[i % len(models):] + list(models)[: i % len(models)]:
            lm = models[backend]
            runs[backend].append(generate(lm.model, lm.tokenizer, prompt, method=method, max_new_tokens=tokens, **options).stats)
    trials = []
    for backend, stats in runs.items():
        new, forwards = sum(s.new_tokens for s in stats), sum(s.target_forwards for s in stats)
        trials.append(BackendTrial(backend, new / sum(s.wall_time for s in stats), new / forwards, 1000 * sum(s.verify_time for s in stats) / forwards))
    return trials


def _stderr(line: str) -> None:
    print(f"specprobe: {line}", file=sys.stderr, flush=True)


def choose_backend(name: str, method: str = DEFAULT_METHOD, options: dict | None = None, *, dtype: str = "float32", device: str = "cpu",
                   llamacpp_options: dict | None = None, log: Callable[[str], None] | None = _stderr, remeasure: bool = False) -> BackendChoice:
    """The backend (`torch` or `llamacpp`) that runs `method` with `options` fastest for model `name`
    on this machine: read from the saved choice, or measured once (about a minute for the built-in
    models) and saved. `log` hears what was chosen and why; `remeasure` ignores a saved choice.

        choice = specprobe.choose_backend("smollm2-135m", "hybrid")
        lm = specprobe.load("smollm2-135m", backend=choice.backend)
    """
    log = log or (lambda line: None)
    if method not in METHODS:
        raise InvalidOptionError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    llamacpp_options = {k: v for k, v in (llamacpp_options or {}).items() if v is not None}
    reason = only_torch_reason(name, method)
    if reason:
        if name.endswith(".gguf"):
            gguf_path(name)  # a missing file is an error, not a reason to pick torch
        log(f"--backend auto chose {reason}")
        return BackendChoice("torch", reason)
    path = _choice_file(name, method, options, dtype, device, llamacpp_options)
    if not remeasure:
        try:
            choice = BackendChoice.from_dict(json.loads(path.read_text()))
            choice.saved_at = str(path)
            log(f"--backend auto chose {choice.reason} (saved in {path})")
            return choice
        except (OSError, ValueError, KeyError, TypeError):
            pass
    log(f"--backend auto: timing {method} on the torch and llamacpp backends for {name}, once on this machine "
        f"({len(CALIBRATION_PROMPTS)} prompts x {CALIBRATION_TOKENS} tokens each)")
    t0 = time.perf_counter()
    models = {"torch": load(name, dtype=dtype, device=device), "llamacpp": load(name, backend="llamacpp", **llamacpp_options)}
    choice = pick(measure(models, method, options, log=log))
    models.clear()
    gc.collect()
    choice.saved_at = str(path)
    atomic_write(path, json.dumps(choice.to_dict(), indent=1) + "\n")
    log(f"--backend auto chose {choice.reason}, measured in {time.perf_counter() - t0:.0f} s (saved in {path})")
    return choice
