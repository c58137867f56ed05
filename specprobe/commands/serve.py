"""`specprobe serve`: the OpenAI-compatible server (server.py) from the command line."""

from __future__ import annotations

from ..errors import InvalidOptionError
from .args import method_options


def run_command(args) -> int:
    from ..drafters import DRAFT_MODEL_METHODS, make_drafter
    from ..models import load, load_draft
    from ..server import Served, create_app

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InvalidOptionError('specprobe serve needs FastAPI and uvicorn: pip install "specprobe[serve]"') from None
    if args.max_queue < 1:
        raise InvalidOptionError("--max-queue must be >= 1")
    if not 0 < args.port < 65536:
        raise InvalidOptionError(f"--port must be in 1..65535, got {args.port}")
    options = method_options(args, args.method)
    if args.method in DRAFT_MODEL_METHODS:
        if not args.draft_model:
            raise InvalidOptionError(f"--method {args.method} needs --draft-model NAME (or truncated:N)")
    else:
        make_drafter(args.method, **options)  # bad options fail before the model loads
    lm = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    if args.method in DRAFT_MODEL_METHODS:  # omnidraft adapts its drafter between requests (one at a time)
        options["draft_model"] = load_draft(args.draft_model, lm, args.dtype, args.device)
        make_drafter(args.method, **options)
    from ..api import prepare

    prepare(lm.model, lm.tokenizer, [args.method], {args.method: options})  # no client waits for one-time work
    served = Served(lm, args.served_name or args.model, args.method, options, args.max_queue)
    import uvicorn

    print(f"specprobe serve: {served.name} ({args.method}) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(served), host=args.host, port=args.port, log_level="warning")
    return 0


def add_parser(sub, add_model_args, add_method_args) -> None:
    from ..drafters import DEFAULT_METHOD, METHODS
    from ..server import __doc__ as server_doc

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions, streaming)", description=server_doc.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help=f"decoding method (default {DEFAULT_METHOD})")
    p.add_argument("--draft-model", help="draft model for draft, omnidraft and omnidraft-frozen: a model name, or truncated:N")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=8, help="requests running or waiting before 429 (default 8)")
    p.add_argument("--served-name", help="the model name clients use (default: --model)")
    add_method_args(p)
    p.set_defaults(func=run_command)
