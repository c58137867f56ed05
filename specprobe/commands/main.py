"""The `specprobe` command line: generate, bench (Spec-Bench), profile (the cost curve T(q)), tune
(ESP settings per model), serve (an OpenAI-compatible server), train-head (EAGLE / ConFu heads).

commands/ is the only place that reads argv or prints for a person; nothing imports it. Errors a
user can cause print one line on stderr and exit with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .. import __version__
from ..errors import SpecProbeError
from . import bench, generate, profile, serve, train_head, tune
from .args import add_method_args, add_model_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specprobe", description="Lossless speculative decoding for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"specprobe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    bench.add_parser(sub)
    profile.add_parser(sub, add_model_args)
    tune.add_parser(sub, add_model_args)
    serve.add_parser(sub, add_model_args, add_method_args)
    train_head.add_parser(sub)
    return parser


def bug_report(exc: BaseException, argv: list[str]) -> Path:
    """Write the traceback of an unexpected error where a bug report can pick it up."""
    from ..store import atomic_write, cache_root

    path = cache_root() / "bug-reports" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    text = f"specprobe {__version__}\nargv: {argv}\n\n" + "".join(traceback.format_exception(exc))
    try:
        atomic_write(path, text, lock=False)
    except OSError:
        path = Path(tempfile.gettempdir()) / path.name
        path.write_text(text)
    return path


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
    except (ValueError, OSError) as e:  # from the user's input: a file, a value
        if args.debug:
            raise
        print(f"specprobe: error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specprobe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback in a file (or here with --debug)
        if args.debug:
            raise
        path = bug_report(e, sys.argv if argv is None else argv)
        print(f"specprobe: internal error ({type(e).__name__}), a bug: please report it with the traceback in {path} (--debug shows it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
