"""`specprobe serve`: the OpenAI-compatible server (server.py) from the command line.

Without an API key the server answers on loopback only: `--host` beyond it needs `--api-key`
(or `SPECPROBE_API_KEY`), or an explicit `--insecure-no-auth`.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from ..errors import InvalidOptionError
from .args import method_options, resolve_backend


def is_loopback(host: str) -> bool:
    """>>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0"), is_loopback("::1")
    (True, True, False, True)"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


AUX_ROW_METHODS = ("esp", "lookahead")  # their drafts come from auxiliary rows (ESP's masks, lookahead's window)
DEFAULT_MAX_BATCH = 8  # generations at once unless told (llama.cpp: a KV stream each, memory for 8 contexts)


def default_max_batch(backend: str, method: str) -> int:
    """Generations served side by side unless --max-batch says: 8 for the methods that batch (the
    rows of several generations share one forward, nearly free on a memory-bound step: a KV stream
    each on llama.cpp, their own caches in one forward on torch); 1 for draft-model methods (their
    draft model is shared) and, on llama.cpp, for methods that draft from mask rows."""
    from ..drafters import DRAFT_MODEL_METHODS

    if method in DRAFT_MODEL_METHODS or (backend == "llamacpp" and method in AUX_ROW_METHODS):
        return 1
    return DEFAULT_MAX_BATCH


def run_command(args) -> int:
    from ..drafters import DRAFT_MODEL_METHODS, make_drafter
    from ..server import create_app

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InvalidOptionError('specprobe serve needs FastAPI and uvicorn: pip install "specprobe[serve]"') from None
    if args.max_queue < 1:
        raise InvalidOptionError("--max-queue must be >= 1")
    if args.max_batch is not None and args.max_batch < 1:
        raise InvalidOptionError("--max-batch must be >= 1")
    if not 0 < args.port < 65536:
        raise InvalidOptionError(f"--port must be in 1..65535, got {args.port}")
    api_key = args.api_key or os.environ.get("SPECPROBE_API_KEY") or None
    if api_key is None and not is_loopback(args.host) and not args.insecure_no_auth:
        raise InvalidOptionError(f"--host {args.host} serves the network: give --api-key KEY (or SPECPROBE_API_KEY), or --insecure-no-auth to serve it without one")
    if args.request_timeout <= 0 or args.max_tokens_cap < 1 or args.max_body < 1024:
        raise InvalidOptionError("--request-timeout must be > 0, --max-tokens-cap >= 1 and --max-body >= 1024")
    from ..server import Limits

    limits = Limits(args.request_timeout, args.max_tokens_cap, args.max_body, api_key)
    options = method_options(args, args.method)
    if args.method in DRAFT_MODEL_METHODS:
        if not args.draft_model:
            raise InvalidOptionError(f"--method {args.method} needs --draft-model NAME (or truncated:N)")
    else:
        make_drafter(args.method, **options)  # bad options fail before the model loads
    from ..api import prepare
    from ..engine.batch import Batcher

    # everything that runs the model's kernels (timing --backend auto, loading, every generation)
    # runs on the batcher's one thread: engine/batch.py says why
    batcher = Batcher(None, 1)
    try:
        served = batcher.call(lambda: _load(args, options, limits, batcher)).result()
    except BaseException:
        batcher.close()
        raise
    max_batch, lm = served.max_batch, served.lm
    # no client waits for one-time work; done on the thread that will run every generation (Batcher.call)
    batcher.call(lambda: prepare(lm.model, lm.tokenizer, [args.method], {args.method: options})).result()
    import uvicorn

    access = "an API key is needed (Authorization: Bearer ...)" if api_key else (
        "no API key: loopback only" if is_loopback(args.host) else "no API key, open to the network (--insecure-no-auth)")
    print(f"specprobe serve: {served.name} ({args.method} on {args.backend}, {max_batch} at once) on http://{args.host}:{args.port}/v1; {access}", flush=True)
    if api_key is None and not is_loopback(args.host):
        print("specprobe serve: WARNING: anyone who can reach this port can generate", file=sys.stderr, flush=True)
    uvicorn.run(create_app(served), host=args.host, port=args.port, log_level="warning")
    return 0


def _load(args, options: dict, limits, batcher):
    """On the batcher's thread: the backend resolved, the model (and a draft model) loaded, the
    batch size checked, and the `Served` that the app serves, on `batcher`."""
    from ..api import target_of
    from ..drafters import DRAFT_MODEL_METHODS, make_drafter
    from ..models import load, load_draft
    from ..server import Served

    resolve_backend(args, args.method, options)
    max_batch = args.max_batch if args.max_batch is not None else default_max_batch(args.backend, args.method)
    if max_batch > 1 and args.method in DRAFT_MODEL_METHODS:
        raise InvalidOptionError(f"--method {args.method} serves one generation at a time (its draft model is shared): use --max-batch 1")
    if max_batch > 1 and args.backend == "llamacpp" and args.method in AUX_ROW_METHODS:
        raise InvalidOptionError(f"--method {args.method} drafts from mask rows, which llama.cpp runs for one generation at a time: use --max-batch 1, or a method such as hybrid, suffix, pld")
    streams = {"streams": max_batch} if args.backend == "llamacpp" and max_batch > 1 else {}  # a KV stream per generation
    lm = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend, **streams)
    if args.method in DRAFT_MODEL_METHODS:  # omnidraft adapts its drafter between requests (one at a time)
        options["draft_model"] = load_draft(args.draft_model, lm, args.dtype, args.device)
        make_drafter(args.method, **options)
    batcher.target = target_of(lm.model)
    batcher.max_batch = max_batch
    return Served(lm, args.served_name or args.model, args.method, options, max(args.max_queue, max_batch), limits,
                  max_batch=max_batch, batcher=batcher)


def add_parser(sub, add_model_args, add_method_args) -> None:
    from ..drafters import DEFAULT_METHOD, METHODS
    from ..server import __doc__ as server_doc

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions, streaming)", description=server_doc.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help=f"decoding method (default {DEFAULT_METHOD})")
    p.add_argument("--draft-model", help="draft model for draft, omnidraft and omnidraft-frozen: a model name, or truncated:N")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=32, help="requests running or waiting before 429 (default 32; at least --max-batch)")
    p.add_argument("--max-batch", type=int, help=f"generations served side by side, one speculative step each per forward "
                   f"(default: {DEFAULT_MAX_BATCH}; 1 for draft-model methods, and for esp and lookahead on llama.cpp)")
    p.add_argument("--served-name", help="the model name clients use (default: --model)")
    p.add_argument("--api-key", help="clients must send Authorization: Bearer KEY (default: $SPECPROBE_API_KEY; none: loopback only)")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may take, queueing included (default 300)")
    p.add_argument("--max-tokens-cap", type=int, default=2048, help="the largest max_tokens a request may ask for (default 2048)")
    p.add_argument("--max-body", type=int, default=1_000_000, help="bytes a request body may hold (default 1000000)")
    add_method_args(p)
    p.set_defaults(func=run_command)
