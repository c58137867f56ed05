"""The benchmark loop: every method on every question, interleaved, one answer line at a time.

Methods are the names of `specprobe.drafters.METHODS` (run through `specprobe.generate`), each
on the bench's backend or, written `method@backend` (`hybrid@llamacpp`), on another one loaded
from the same model; and reference rows run by other software: transformers' `hf`
(`model.generate`, greedy), `hf-pld` (its prompt lookup, 10 tokens), `hf-assisted` (its assisted
generation with the draft model) and `hf-uag` (its universal assisted generation: a draft model
with a different tokenizer); llama-cpp-python's `llamacpp` (greedy) and `llamacpp-lookup` (its
prompt-lookup drafting), see llamacpp_rows.py.

First each method's one-time work (`specprobe.api.prepare`: kernel plans, the cost curve, a
short warm-up generation on a prompt of its own), announced on stderr, so no question's time holds
it. Then the methods run in turn on each question, in an order rotated from one question to the
next (A B C, B C A, C A B, ...), so a slow moment of the machine hits every method alike and no
method always runs first. `repeats=N` runs every (question, method) N times, rotating again
between rounds, and keeps the median wall time (report.py shows the spread). An answer that
differs from its `ar` records where, and whether ar's logits there were a near-tie (divergence.py).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..api import WARMUP_PROMPT, WARMUP_TOKENS, generate, prepare, target_of
from ..drafters import DRAFT_MODEL_METHODS, METHODS
from ..engine.budget import CostCurve
from ..errors import BenchError, InvalidOptionError
from ..models import format_prompt
from ..store import atomic_write
from .answers import SETTINGS_FILE, TurnOutput, answer_files, answer_path, append_record, cut_incomplete_tail, make_record, median_turn, read_answer_file
from .divergence import explain
from .progress import make_progress
from .report import identical_reference

HF_METHODS = ("hf", "hf-pld", "hf-assisted", "hf-uag")
LLAMACPP_METHODS = ("llamacpp", "llamacpp-lookup")
REFERENCE_METHODS = (*HF_METHODS, *LLAMACPP_METHODS)
BACKENDS = ("torch", "llamacpp")
HF_PLD_TOKENS = 10
# settings that must not change between a run and its --resume (answers would not compare)
RESUME_KEYS = ("model", "max_new_tokens", "turns", "draft_model", "dtype", "device", "repeats")


def rotated(methods: list[str], k: int) -> list[str]:
    """The methods in the order of round k: rotated left by k.

    >>> rotated(["ar", "esp", "pld"], 1)
    ['esp', 'pld', 'ar']
    """
    k %= max(1, len(methods))
    return methods[k:] + methods[:k]


def all_methods() -> list[str]:
    return [*METHODS, *REFERENCE_METHODS]


def split_method(name: str) -> tuple[str, str | None]:
    """("hybrid", "llamacpp") for "hybrid@llamacpp"; (name, None) without a backend.

    >>> split_method("hybrid@llamacpp"), split_method("ar")
    (('hybrid', 'llamacpp'), ('ar', None))
    """
    method, _, backend = name.partition("@")
    return method, (backend or None)


def backends_needed(methods: list[str], main: str) -> set[str]:
    """The backends a list of methods runs on besides `main` (transformers' rows need torch,
    llama-cpp-python's the llamacpp backend's file)."""
    needed = set()
    for m in methods:
        base, backend = split_method(m)
        needed.add(backend or ("torch" if base in HF_METHODS else "llamacpp" if base in LLAMACPP_METHODS else main))
    return needed - {main}


def check_methods(methods: list[str], has_draft_model: bool) -> list[str]:
    """The methods, de-duplicated in order; unknown ones and missing draft models are errors."""
    methods = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    if not methods:
        raise InvalidOptionError("no methods given")
    unknown = [m for m in methods if split_method(m)[0] not in all_methods() or split_method(m)[1] not in (None, *BACKENDS)
               or (split_method(m)[1] and split_method(m)[0] in REFERENCE_METHODS)]
    if unknown:
        raise InvalidOptionError(f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; choose from {', '.join(all_methods())}")
    needs_draft = [m for m in methods if split_method(m)[0] in ("hf-assisted", "hf-uag", *DRAFT_MODEL_METHODS)]
    if needs_draft and not has_draft_model:
        raise InvalidOptionError(f"method {needs_draft[0]} needs a draft model: pass --draft-model NAME or --draft-model truncated:N")
    return methods


def model_backend(method: str, main: str) -> str:
    """The backend whose LoadedModel runs `method`."""
    base, backend = split_method(method)
    if backend:
        return backend
    return "torch" if base in HF_METHODS else "llamacpp" if base in LLAMACPP_METHODS else main


def _backend_facts(lm) -> dict:
    """What the settings record of a backend: its kind, and for llama.cpp its file and settings."""
    model = lm.model
    if getattr(lm, "backend", "torch") == "llamacpp":
        from ..backends.llamacpp import batch_invariant_build

        return {"kind": "llamacpp", "file": model.path.name, "threads": model.threads, "context": model.max_length,
                "flash_attention": model.settings.flash_attention, "extra_bufts": model.settings.extra_bufts,
                "batch_invariant_build": batch_invariant_build(), "max_rows": target_of(model).max_rows()}
    return {"kind": "torch", "dtype": str(getattr(model, "dtype", "")), "threads": torch.get_num_threads()}


def hf_turn(lm, method: str, messages: list[dict], max_new_tokens: int, draft_model=None, sampling: dict | None = None) -> TurnOutput:
    """One turn decoded by transformers' own `generate` (greedy, or sampling with the same settings)."""
    prompt_ids = format_prompt(lm.tokenizer, messages)
    extra = {"do_sample": False}
    sampling = sampling or {}
    if sampling.get("temperature", 0) > 0:
        extra = {"do_sample": True, "temperature": sampling["temperature"], "top_p": sampling.get("top_p", 1.0), "top_k": sampling.get("top_k", 0)}
        if sampling.get("seed") is not None:
            torch.manual_seed(sampling["seed"])
    if method == "hf-pld":
        extra["prompt_lookup_num_tokens"] = HF_PLD_TOKENS
    elif method == "hf-assisted":
        extra["assistant_model"] = getattr(draft_model, "model", draft_model)
    elif method == "hf-uag":  # the draft's tokenizer may differ: transformers re-tokenises between them
        extra.update(assistant_model=draft_model.model, tokenizer=lm.tokenizer, assistant_tokenizer=draft_model.tokenizer)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    forwards = []  # one entry per forward of the target model (the draft model is another module)
    hook = lm.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=lm.model.device)
            t0 = time.perf_counter()
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, pad_token_id=pad, **extra)
            wall = time.perf_counter() - t0
    finally:
        hook.remove()
    new = out[0, len(prompt_ids) :].tolist()
    text = lm.tokenizer.decode(new, skip_special_tokens=True)
    if method == "hf":  # one forward per token: tau is 1 by definition
        return TurnOutput(text, new, len(new), wall, [1] * len(new))
    return TurnOutput(text, new, len(forwards), wall, None)  # target forwards counted by a hook; accept lengths not observable


def run_turn(lm, method: str, messages: list[dict], max_new_tokens: int, options: dict, draft_model=None) -> TurnOutput:
    """One turn of `method` on `lm` (for `method@backend` and the reference rows, the caller
    passes the LoadedModel of that backend)."""
    method = split_method(method)[0]
    if method in HF_METHODS:
        return hf_turn(lm, method, messages, max_new_tokens, draft_model, options)
    if method in LLAMACPP_METHODS:
        from .llamacpp_rows import llamacpp_turn

        return llamacpp_turn(lm, options["llama"], messages, max_new_tokens, options.get("sampling"))
    target = target_of(lm.model)
    target.learning_scope(method)  # what the backend learns across requests: each method its own (no method learns another's answers)
    r = generate(lm.model, lm.tokenizer, messages, method=method, max_new_tokens=max_new_tokens, **options)
    s = r.stats
    curve = CostCurve.from_dict(target.cost_curve())
    bound_time = sum(curve(q) for q in s.step_rows)
    return TurnOutput(r.text, r.token_ids, s.target_forwards, s.wall_time, list(s.accept_lengths), bound_time, curve(1), sum(s.draft_sizes), s.adapt_time)


def run_question(lm, question: dict, method: str, turns: int, max_new_tokens: int, options: dict, draft_model=None) -> list[TurnOutput]:
    """The conversation of one question: each later turn sees the earlier questions and answers."""
    messages, outputs = [], []
    for turn in question["turns"][:turns]:
        messages.append({"role": "user", "content": turn})
        out = run_turn(lm, method, messages, max_new_tokens, options, draft_model)
        messages.append({"role": "assistant", "content": out.text})
        outputs.append(out)
    return outputs


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def check_out_dir(out: Path, resume: bool) -> None:
    """Without --resume, a folder that already holds answer files is an error (they would mix)."""
    if not resume and Path(out).is_dir() and answer_files(Path(out)):
        raise BenchError(f"{out} already holds answer files; pass --resume to continue that run, or choose a new --out")


def _prepare_dir(out: Path, settings: dict, resume: bool) -> dict:
    """Check that `out` may receive this run's answers; returns the settings to record."""
    check_out_dir(out, resume)
    old_path = out / SETTINGS_FILE
    if not (resume and old_path.is_file()):
        return settings
    try:
        old = json.loads(old_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"cannot read {old_path}: {e}") from None
    for key in RESUME_KEYS:
        if None not in (old.get(key), settings.get(key)) and old[key] != settings[key]:
            raise BenchError(f"cannot resume {out}: {key} was {old[key]!r}, now {settings.get(key)!r}; use a new --out")
    old_options = old.get("method_options", {})
    for method, opts in settings["method_options"].items():
        if method in old_options and old_options[method] != opts:
            raise BenchError(f"cannot resume {out}: the options of {method} were {old_options[method]}, now {opts}; use a new --out")
    merged = dict(settings)
    merged["methods"] = list(dict.fromkeys([*old.get("methods", []), *settings["methods"]]))
    merged["method_options"] = {**old_options, **settings["method_options"]}
    return merged


def _done_pairs(out: Path, model: str, methods: list[str]) -> set[tuple[str, object]]:
    """(method, question_id) pairs already answered; other models' answers in `out` are an error."""
    done = set()
    for path in answer_files(out):
        for r in read_answer_file(path):
            if r.get("model_id", model) != model:
                raise BenchError(f"{out} holds answers of model {r['model_id']!r} ({path.name}); use a new --out for {model!r}")
            done.add((r["method"], r["question_id"]))
    for method in methods:
        cut_incomplete_tail(answer_path(out, model, method))
    return done


def run_bench(
    lm,
    questions: list[dict],
    methods: list[str],
    out_dir,
    *,
    max_new_tokens: int = 128,
    turns: int = 1,
    method_options: dict[str, dict] | None = None,
    draft_model=None,
    resume: bool = False,
    progress: bool | None = None,
    settings: dict | None = None,
    sampling: dict | None = None,
    repeats: int = 1,
    models: dict | None = None,
) -> dict:
    """Run `methods` on `questions` with the loaded model `lm` (a `specprobe.models.LoadedModel`),
    write the answer files, summary.json, summary.md and the plots into `out_dir`; returns the summary.

    method_options: per method, the options passed to `specprobe.generate`.
    draft_model: a LoadedModel for `draft` (as its draft_model option), `omnidraft`, `hf-assisted`
    and `hf-uag` (`omnidraft` and `hf-uag` read its tokenizer; the others also take a bare model).
    progress: True for the rich bar, False for a line per question, None to pick by stderr being a terminal.
    settings: extra entries recorded in settings.json and the summary (question source, dtype, ...).
    repeats: runs of every (question, method); the answer keeps the median wall time.
    models: LoadedModels of the same model on other backends, by backend name, for
    `method@backend` rows and the reference rows that need them (transformers' rows need "torch").
    """
    from .report import write_summary

    if turns not in (1, 2):
        raise InvalidOptionError(f"--turns must be 1 or 2, got {turns!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidOptionError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise InvalidOptionError(f"--repeats must be a positive integer, got {repeats!r}")
    draft = getattr(draft_model, "model", draft_model)
    if any(split_method(m)[0] in ("hf-uag", "omnidraft", "omnidraft-frozen") for m in methods) and not hasattr(draft_model, "tokenizer"):
        raise InvalidOptionError("hf-uag and omnidraft(-frozen) need the draft model's tokenizer: pass a LoadedModel (specprobe.load(name))")
    methods = check_methods(methods, draft is not None)
    main = getattr(lm, "backend", "torch")
    models = {main: lm, **(models or {})}
    missing = sorted(backends_needed(methods, main) - set(models))
    if missing:
        raise InvalidOptionError(f"methods {', '.join(methods)} need the model on backend {', '.join(missing)} too (pass models={{backend: LoadedModel}})")
    method_options = {m: dict((method_options or {}).get(m, {})) for m in methods}
    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    run_options = {m: ({**o, "draft_model": draft_model} if split_method(m)[0] in DRAFT_MODEL_METHODS else o) for m, o in method_options.items()}
    if sampling.get("temperature", 0) > 0:  # every method samples with the same settings
        run_options = {m: {**o, **sampling} for m, o in run_options.items()}
    for m in methods:
        run_options.setdefault(m, dict(sampling) if sampling.get("temperature", 0) > 0 else {})
    out = Path(out_dir)
    record_settings = {
        "model": lm.name,
        "methods": methods,
        "max_new_tokens": max_new_tokens,
        "turns": turns,
        "method_options": {m: {k: _jsonable(v) for k, v in o.items()} for m, o in method_options.items()},
        "draft_model": getattr(draft_model, "name", None if draft is None else type(draft).__name__),
        "hf_pld_tokens": HF_PLD_TOKENS if "hf-pld" in methods else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": __import__("transformers").__version__,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        "sampling": sampling if sampling.get("temperature", 0) > 0 else None,
        "repeats": repeats,
        "order": "rotated per question",
        "cross_request_learning": "the reduced draft head's token counts: one scope per method (Backend.learning_scope); "
        "omnidraft's adapter, n-gram cache and acceptance model: per method, across the questions in run order",
        "backend": main,
        "backends": {b: _backend_facts(m) for b, m in models.items()},
        **(settings or {}),
    }
    record_settings = _prepare_dir(out, record_settings, resume)
    done = _done_pairs(out, lm.name, methods) if resume and out.is_dir() else set()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / SETTINGS_FILE, json.dumps(record_settings, indent=2) + "\n")

    todo = [(q, [m for m in methods if (m, q["question_id"]) not in done]) for q in questions]
    todo = [(q, ms) for q, ms in todo if ms]
    model_of = {m: models[model_backend(m, main)] for m in methods}
    if todo:
        pending = list(dict.fromkeys(m for _, ms in todo for m in ms))  # the methods with work left
        for m in pending:
            if split_method(m)[0] in LLAMACPP_METHODS:  # llama-cpp-python's own Llama on the same file
                from .llamacpp_rows import reference_llama

                target = model_of[m].model
                run_options[m] = {**run_options[m], "llama": reference_llama(target.path, target.max_length, target.threads, m == "llamacpp-lookup"),
                                  "sampling": sampling}
        for model in models.values():
            own = [split_method(m)[0] for m in pending if model_of[m] is model and split_method(m)[0] not in REFERENCE_METHODS]
            prepare(model.model, model.tokenizer, own, {split_method(m)[0]: run_options[m] for m in pending if model_of[m] is model}, warm_up=False)
        t0 = time.perf_counter()
        for m in pending:  # each method's own first-call work (and the reference rows'), out of the timed runs
            run_turn(model_of[m], m, [{"role": "user", "content": WARMUP_PROMPT}], min(WARMUP_TOKENS, max_new_tokens), run_options[m], draft_model)
        print(f"specprobe bench: warm-up of {', '.join(pending)}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        try:
            with make_progress(len(todo), repeats * sum(len(ms) for _, ms in todo), progress) as bar:
                for i, (q, ms) in enumerate(todo):
                    runs: dict[str, list[list[TurnOutput]]] = {m: [] for m in ms}
                    for r in range(repeats):
                        for m in rotated(ms, i + r):
                            bar.start(q, m)
                            runs[m].append(run_question(model_of[m], q, m, turns, max_new_tokens, run_options[m], draft_model))
                            bar.finished(q, m)
                    records = []
                    outputs_of = {m: [median_turn([run[t] for run in runs[m]]) if repeats > 1 else runs[m][0][t] for t in range(len(runs[m][0]))] for m in ms}
                    for m in ms:  # answer files in the methods' own order
                        outputs = outputs_of[m]
                        record = make_record(q, lm.name, m, outputs)
                        reference = identical_reference(m, methods, main)
                        if reference in outputs_of and reference != m:  # where it differs from its ar: a near-tie there?
                            difference = explain(model_of[reference], q, outputs_of[reference], outputs)
                            record["choices"][0]["first_difference"] = difference.to_dict() if difference else None
                        append_record(answer_path(out, lm.name, m), record)
                        records.append(record)
                    bar.question_done(q, records)
        except KeyboardInterrupt:
            print(f"specprobe bench: stopped; the answers so far are in {out} (run again with --resume)", file=sys.stderr)
            raise
    return write_summary(out)

