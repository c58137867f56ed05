"""`specprobe generate`: generate text from a prompt, streaming it; `--compare` runs plain decoding
(and other methods) on the same prompt after an announced warm-up and reports the speed-ups."""

from __future__ import annotations

import argparse
import json
import sys

from ..drafters import DEFAULT_METHOD, DRAFT_MODEL_METHODS, METHODS, make_drafter
from ..errors import InvalidOptionError, SpecProbeError
from .args import add_method_args, add_model_args, add_sampling_args, method_options, resolve_backend, sampling_options


class TextStream:
    """Prints generated text as tokens arrive (holding back incomplete UTF-8 sequences)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def close(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()


def read_stdin() -> str:
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidOptionError(f"standard input is not UTF-8 text ({e.reason} at byte {e.start})") from None


def compare_methods(args: argparse.Namespace) -> list[str] | None:
    """The methods `--compare` runs beside ar (None: no comparison). `--compare` alone compares
    --method; `--compare esp,hybrid` those methods. A value that is not a list of methods is the
    prompt (`--compare "Why is the sky blue?"`, the prompt given right after the flag)."""
    value = args.compare
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if value and names and all(n in METHODS for n in names):
        return list(dict.fromkeys(names))
    if value and args.prompt is None:  # the prompt, taken by the flag
        args.prompt = value
    elif value:
        unknown = [n for n in names if n not in METHODS]
        raise InvalidOptionError(f"--compare: unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown) or repr(value)}; choose from {', '.join(METHODS)}")
    return [args.method]


def run_command(args: argparse.Namespace) -> int:
    from ..api import generate, prepare
    from ..models import load

    compared = compare_methods(args)
    if args.prompt is None:
        raise SpecProbeError("give a prompt (or '-' to read standard input)")
    prompt = read_stdin() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise SpecProbeError("the prompt is empty")
    methods = compared or [args.method]
    options = {m: method_options(args, m) for m in methods}
    sampling = sampling_options(args)
    for m in methods:
        if m in DRAFT_MODEL_METHODS:
            if not args.draft_model:
                raise SpecProbeError(f"--method {m} needs --draft-model (a model name, or truncated:N)")
        else:
            make_drafter(m, **options[m])  # validate the options before the slow model load
    resolve_backend(args, methods[0], options[methods[0]])
    lm = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    if any(m in DRAFT_MODEL_METHODS for m in methods):
        from ..models import load_draft

        draft = load_draft(args.draft_model, lm, args.dtype, args.device)
        for m in methods:
            if m in DRAFT_MODEL_METHODS:
                options[m]["draft_model"] = draft
    chat = False if args.raw else None
    if compared:  # every one-time piece of work now, announced, so that no timed run pays for it
        prepare(lm.model, lm.tokenizer, ["ar", *methods], options)
    stream = None if args.json else TextStream(lm.tokenizer)
    results = {}
    for i, m in enumerate(methods):
        results[m] = generate(
            lm.model, lm.tokenizer, prompt, method=m, max_new_tokens=args.max_new_tokens, chat=chat,
            on_tokens=stream if i == 0 else None, **sampling, **options[m],
        )
        if i == 0 and stream is not None:
            stream.close()
    ar = generate(lm.model, lm.tokenizer, prompt, method="ar", max_new_tokens=args.max_new_tokens, chat=chat, **sampling) if compared else None

    def record_of(m: str, result) -> dict:
        record = result.to_dict()
        record.pop("token_ids")
        record.update(model=args.model, options={k: v for k, v in options[m].items() if k != "draft_model"}, sampling=sampling)
        if m in DRAFT_MODEL_METHODS:
            record["options"]["draft_model"] = args.draft_model
        if ar is not None:
            record["ar_tokens_per_s"] = ar.stats.tokens_per_s
            record["speedup"] = result.stats.tokens_per_s / ar.stats.tokens_per_s if ar.stats.tokens_per_s else 0.0
            record["identical_to_ar"] = ar.token_ids == result.token_ids
        return record

    records = {m: record_of(m, r) for m, r in results.items()}
    if args.json:
        first = dict(records[methods[0]])
        if len(methods) > 1:
            first["compare"] = {m: records[m] for m in methods}
        print(json.dumps(first))
        return 0
    width = max(len(m) for m in [*methods, "ar"])
    for m, result in results.items():
        s, r = result.stats, records[m]
        line = f"[{m}]{' ' * (width - len(m))} {s.new_tokens} tokens in {s.wall_time:.2f} s: {s.tokens_per_s:.1f} tok/s, tau {s.tau:.2f} ({s.target_forwards} target forwards)"
        if ar is not None:
            line += f" | speedup {r['speedup']:.2f}x over ar, identical to ar: {'yes' if r['identical_to_ar'] else 'NO'}"
        print(line, file=sys.stderr)
    if ar is not None:
        s = ar.stats
        print(f"[ar]{' ' * (width - 2)} {s.new_tokens} tokens in {s.wall_time:.2f} s: {s.tokens_per_s:.1f} tok/s", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt, streaming it", description="Generate greedily with a speculative method; the tokens equal plain greedy decoding.")
    add_model_args(g)
    g.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help=f"decoding method (default {DEFAULT_METHOD})")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument(
        "--compare", nargs="?", const="", default=None, metavar="METHODS",
        help="also run ar on the same prompt (after an announced warm-up) and report each method's speedup and identical_to_ar; "
        "METHODS: comma-separated methods to compare (default: --method), e.g. --compare esp,hybrid",
    )
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat/plain template")
    g.add_argument("--draft-model", help="for --method draft: a model name, or truncated:N (the target's first N layers)")
    add_method_args(g)
    add_sampling_args(g)
    g.add_argument("prompt", nargs="?", help="the prompt ('-' reads standard input)")
    g.set_defaults(func=run_command)
