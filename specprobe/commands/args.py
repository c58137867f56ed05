"""The flag tables and option parsing every command shares: model flags, method flags (one table
for generate, bench and serve), sampling flags, and turning parsed flags into API options."""

from __future__ import annotations

import argparse
import dataclasses

from ..drafters import METHODS
from ..engine.sampling import SamplingConfig
from ..models import BUILTIN_MODELS, DEFAULT_MODEL

# CLI flag -> (drafter option name, type, help). Flags a method does not take are ignored for it.
METHOD_FLAGS = {
    "--masks": ("masks", int, "ESP, hybrid: mask rows after each tree node (k; drafts reach depth k)"),
    "--branching": ("branching", int, "ESP, hybrid: K, candidates per depth and children per node"),
    "--budget": ("budget", str, "ESP, PLD, hybrid: tree nodes verified per step, or auto (ESP, hybrid: the size that maximises tokens/s on this machine)"),
    "--mask-init": ("mask_init", str, "ESP, hybrid: vocab-mean | context-mean | ema | gaussian | soft-prev | slot-mix | token:ID"),
    "--ema-lambda": ("ema_lambda", float, "ESP: EMA rate for --mask-init ema"),
    "--max-budget": ("max_budget", int, "ESP, hybrid: the largest tree --budget auto considers"),
    "--max-ngram": ("max_ngram", int, "PLD, hybrid: longest suffix searched for"),
    "--min-ngram": ("min_ngram", int, "PLD: shortest suffix searched for"),
    "--num-pred-tokens": ("num_pred_tokens", int, "PLD, hybrid: tokens copied after a match"),
    "--max-candidates": ("max_candidates", int, "PLD, hybrid: continuations merged into the tree"),
    "--window": ("window", int, "lookahead: W, columns of the Jacobi window"),
    "--ngram": ("ngram", int, "lookahead, hybrid: N, n-gram length"),
    "--guess": ("guess", int, "lookahead: G, n-grams verified per step"),
    "--num-tokens": ("num_tokens", int, "draft: draft depth per step"),
    "--tree-top-k": ("tree_top_k", int, "draft: tokens proposed per depth (1 = chain)"),
    "--head": ("head", str, "eagle, confu: a trained head directory (specprobe train-head)"),
    "--depth": ("depth", int, "eagle, confu: head passes per step (the deepest draft)"),
    "--draft-layers": ("draft_layers", int, "omnidraft: draft with the draft model's first N layers"),
    "--ngram-cache": ("ngram_cache", str, "omnidraft: JSON file the vocabulary bridge's n-gram cache is loaded from and saved to"),
    "--adapt-state": ("adapt_state", str, "omnidraft: file the online-distilled adapter (and n-gram cache, acceptance model) is loaded from and saved to after each request"),
    "--adapt-lr": ("adapt_lr", float, "omnidraft: learning rate of the online distillation (default 2e-3)"),
    "--adapt-rank": ("adapt_rank", int, "omnidraft: LoRA rank of the online distillation (default 8)"),
    "--recycle-k": ("k", int, "token-recycling: successors kept per token (default 8)"),
    "--max-depth": ("max_depth", int, "token-recycling: deepest draft (default 8)"),
    "--state": ("state_file", str, "token-recycling: file the adjacency matrix is loaded from and saved to after each request"),
    "--max-tree-depth": ("max_tree_depth", int, "suffix: longest substring kept and matched (default 24)"),
    "--max-spec-tokens": ("max_spec_tokens", int, "suffix: most nodes speculated per step (default 32)"),
    "--max-spec-factor": ("max_spec_factor", float, "suffix: speculation depth <= factor x match length (default 1.0)"),
    "--min-token-prob": ("min_token_prob", float, "suffix: least frequency of a speculated continuation (default 0.1)"),
    "--max-cached-requests": ("max_cached_requests", int, "suffix: earlier outputs kept in the global trie (default 200)"),
}


def add_model_args(p: argparse.ArgumentParser, auto: bool = True) -> None:
    """--model, --backend (with `auto` where the command runs a method), --dtype, --device."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in alias ({', '.join(BUILTIN_MODELS)}), hub id, model directory or .gguf file (default {DEFAULT_MODEL})",
    )
    p.add_argument("--backend", default="torch", choices=["torch", "llamacpp", *(["auto"] if auto else [])],
                   help="torch (default: the model in PyTorch), llamacpp (a GGUF file on llama.cpp, quantised as it is)"
                   + (" or auto (the one that runs the method faster on this machine: timed once, saved)" if auto else ""))
    p.add_argument("--dtype", default="float32", help="torch backend: float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch backend: torch device (default cpu)")


def resolve_backend(args: argparse.Namespace, method: str, options: dict | None = None) -> None:
    """Make args.backend concrete: `auto` becomes the backend chosen for `method` (backend_choice.py)."""
    if args.backend == "auto":
        from ..backend_choice import choose_backend

        args.backend = choose_backend(args.model, method, options, dtype=args.dtype, device=args.device).backend


def add_method_args(p: argparse.ArgumentParser) -> None:
    for flag, (dest, typ, help_) in METHOD_FLAGS.items():
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample, losslessly")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (same seed, same machine: same output)")


def sampling_options(args: argparse.Namespace) -> dict:
    SamplingConfig(args.temperature, args.top_p, args.top_k, args.seed)  # validate before any model loads
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}


def method_options(args: argparse.Namespace, method: str) -> dict:
    """The method options given on the command line that `method` takes."""
    _, config_cls = METHODS[method]
    if config_cls is None:
        return {}
    names = {f.name for f in dataclasses.fields(config_cls)}
    return {dest: getattr(args, dest) for dest, *_ in METHOD_FLAGS.values() if dest in names and getattr(args, dest) is not None}


