"""The `specprobe` command line: generate (and, as they land, bench and friends).

Errors a user can cause print one line on stderr and exit with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import SpecProbeError
from .models import BUILTIN_MODELS, DEFAULT_MODEL

# CLI flag -> (drafter option name, type, help). Flags a method does not take are ignored for it.
METHOD_FLAGS = {
    "--masks": ("masks", int, "ESP: mask rows after each tree node (k; drafts reach depth k)"),
    "--top-k": ("top_k", int, "ESP: candidates per depth (K)"),
    "--budget": ("budget", int, "ESP: tree nodes verified per step"),
    "--mask-init": ("mask_init", str, "ESP: context-mean | ema | vocab-mean | token:ID"),
    "--ema-lambda": ("ema_lambda", float, "ESP: EMA rate for --mask-init ema"),
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in alias ({', '.join(BUILTIN_MODELS)}), hub id, model directory or .gguf file (default {DEFAULT_MODEL})",
    )
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_method_args(p: argparse.ArgumentParser) -> None:
    for flag, (dest, typ, help_) in METHOD_FLAGS.items():
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)


def method_options(args: argparse.Namespace, method: str) -> dict:
    """The method options given on the command line that `method` takes."""
    from .drafters import METHODS

    import dataclasses

    _, config_cls = METHODS[method]
    if config_cls is None:
        return {}
    names = {f.name for f in dataclasses.fields(config_cls)}
    return {dest: getattr(args, dest) for dest, *_ in METHOD_FLAGS.values() if dest in names and getattr(args, dest) is not None}


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


def cmd_generate(args: argparse.Namespace) -> int:
    from . import generate, load
    from .drafters import make_drafter

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise SpecProbeError("the prompt is empty")
    options = method_options(args, args.method)
    make_drafter(args.method, **options)  # validate the options before the slow model load
    lm = load(args.model, dtype=args.dtype, device=args.device)
    chat = False if args.raw else None
    if args.compare:  # warm up kernels and caches so neither timed run pays for it
        generate(lm.model, lm.tokenizer, prompt, method="ar", max_new_tokens=4, chat=chat)
    stream = None if args.json else TextStream(lm.tokenizer)
    result = generate(
        lm.model, lm.tokenizer, prompt, method=args.method, max_new_tokens=args.max_new_tokens, chat=chat, on_tokens=stream, **options
    )
    if stream is not None:
        stream.close()
    record = result.to_dict()
    record.pop("token_ids")
    record.update(model=args.model, options=options)
    if args.compare:
        ar = generate(lm.model, lm.tokenizer, prompt, method="ar", max_new_tokens=args.max_new_tokens, chat=chat)
        record["ar_tokens_per_s"] = ar.stats.tokens_per_s
        record["speedup"] = result.stats.tokens_per_s / ar.stats.tokens_per_s if ar.stats.tokens_per_s else 0.0
        record["identical_to_ar"] = ar.token_ids == result.token_ids
    if args.json:
        print(json.dumps(record))
    else:
        s = result.stats
        line = (
            f"[{args.method}] {s.new_tokens} tokens in {s.wall_time:.2f} s: {s.tokens_per_s:.1f} tok/s, "
            f"tau {s.tau:.2f} ({s.target_forwards} target forwards)"
        )
        if args.compare:
            line += (
                f" | ar {record['ar_tokens_per_s']:.1f} tok/s, speedup {record['speedup']:.2f}x, "
                f"identical to ar: {'yes' if record['identical_to_ar'] else 'NO'}"
            )
        print(line, file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .drafters import METHODS

    parser = argparse.ArgumentParser(prog="specprobe", description="Lossless speculative decoding for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"specprobe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streaming it", description="Generate greedily with a speculative method; the tokens equal plain greedy decoding.")
    add_model_args(g)
    g.add_argument("--method", default="esp", choices=list(METHODS), help="decoding method (default esp)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--compare", action="store_true", help="also run ar on the same prompt; report speedup and identical_to_ar")
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat/plain template")
    add_method_args(g)
    g.add_argument("prompt", help="the prompt ('-' reads standard input)")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        parser.error("--max-new-tokens must be >= 1")
    try:
        return args.func(args)
    except SpecProbeError as e:
        print(f"specprobe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specprobe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
