"""Matrix products as the engine computes them: the fastest exact kernel per number of rows.

A vocabulary projection logits = h @ W.T can be run several ways that compute the same dot
products (each logit is one row of W times one row of h; only the summation order inside a dot
product may differ between kernels):

    linear   F.linear(h, W)              what nn.Linear (and transformers) call
    mm       torch.mm(W, h.T).T          the weight as the left operand
    vm       torch.mm(h, W.T copy)       one row times a transposed copy (heads only)
    packed   oneDNN's linear on a copy of W in its blocked layout (heads only)

On a CPU their speed differs wildly with the number of rows q (figures: docs/engine-measurements.md;
`linear` has a slow path for a few rows). Two exact tricks widen the choice: rows can be PADDED
(q = 1 run as q = 2, the extra row discarded) and SPLIT (q = 8 run as two q = 4 products).
`plan_rows` takes a measured cost per (kernel, q) and returns, per q, the cheapest way to cover q
rows. The same holds for every linear layer of the decoder. `planned_decoder` returns a copy of the decoder whose linear layers run their plan (the weight
tensors are shared, the user's model is not modified); `LMHead` runs the head's plan. Costs are
measured once per weight shape, dtype, device and thread count (on enough copies of the weight to
exceed the CPU caches) and saved on disk; rows beyond 64 (prefill) use `linear`.

Rows that only feed drafts (ESP masks, lookahead rows) may use `LMHead.reduced`: logits over a
subset of the vocabulary (the tokens the engine has seen most often, draft_vocab.py), every other
logit -inf, wherever the measured costs say it pays (`LMHead.reduced_pays`). Verification rows
always get the full head, so the emitted tokens do not depend on it.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...store import atomic_write, cache_root, file_name, locked

KERNELS = {
    "linear": lambda w, h: F.linear(h, w),  # w [V, hidden], h [q, hidden] -> [q, V]
    "mm": lambda w, h: torch.mm(w, h.T).T,
    "vm": lambda wt, h: torch.mm(h, wt),  # wt [hidden, V]: the weight transposed, a copy (heads only)
    "packed": lambda wp, h: torch.ops.mkldnn._linear_pointwise(h, wp, None, "none", [], ""),  # wp: oneDNN's blocked copy
}
# kernels that read a copy of the weight in another layout (heads only: the copy costs the head's memory again)
WEIGHT_COPIES = {
    "vm": lambda w: w.detach().T.contiguous(),
    "packed": lambda w: torch.ops.mkldnn._reorder_linear_weight(w.detach(), None),
}
VM_MAX_Q = 4  # `vm` is a one-row kernel (several times slower than `mm` from a few rows): not timed beyond
LAYER_KERNELS = ("linear", "mm")
COPY_GAIN = 0.85  # a head keeps a copy only if it makes one row, or the sum over COPY_QS, this much cheaper
COPY_QS = (1, 2, 4, 8, 16)  # a decoding step and the tree sizes the budget picks on a CPU
REDUCED_GAIN = 0.85  # draft-only rows leave the full head only if that makes the head this much cheaper
FILL_BYTES_PER_S = 5e9  # writing the reduced rows' -inf logits: a low estimate of this CPU's write speed
MEASURED_Q = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
PLAN_VERSION = 3


def head_kernels(dtype=torch.float32, device="cpu") -> tuple[str, ...]:
    """The kernels a head's plan may use: `packed` where oneDNN takes this weight (float32 on a CPU)."""
    kernels = ("linear", "mm", "vm")
    packed_ok = torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    return kernels + ("packed",) if packed_ok and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else kernels


@dataclass(frozen=True)
class Piece:
    rows: int  # real rows taken from the input
    run_as: int  # rows the kernel runs on (>= rows: padding)
    kernel: str


def plan_rows(costs: dict[tuple[str, int], float], q_max: int) -> dict[int, list[Piece]]:
    """Cheapest exact cover of q rows, for every q in 1..q_max, from measured kernel costs.

    direct(q) = the cheapest (kernel, m) with a measured m >= q (run on q rows padded to m);
    best(q) = min(direct(q), best(a) + best(q - a)) over splits.

    Example: linear is slow at q = 1 and 2, mm is cheap at 2 and 4 but slow at 8:
    >>> c = {("linear", 1): 6.0, ("linear", 2): 14.0, ("mm", 1): 6.0, ("mm", 2): 3.0,
    ...      ("mm", 4): 3.5, ("linear", 8): 12.0, ("mm", 8): 11.0}
    >>> p = plan_rows(c, 8)
    >>> p[1]                       # one row, padded to two
    [Piece(rows=1, run_as=2, kernel='mm')]
    >>> p[8]                       # eight rows as two products of four
    [Piece(rows=4, run_as=4, kernel='mm'), Piece(rows=4, run_as=4, kernel='mm')]
    """
    def direct(q: int) -> tuple[float, Piece] | None:
        options = [(c, Piece(q, m, k)) for (k, m), c in costs.items() if m >= q]
        return min(options, key=lambda o: (o[0], o[1].run_as)) if options else None

    best: dict[int, tuple[float, list[Piece]]] = {}
    for q in range(1, q_max + 1):
        d = direct(q)
        cand = (d[0], [d[1]]) if d else (float("inf"), [])
        for a in range(1, q // 2 + 1):
            c = best[a][0] + best[q - a][0]
            if c < cand[0] * 0.97:  # a split must win clearly: noise should not fragment plans
                cand = (c, best[a][1] + best[q - a][1])
        best[q] = cand
    return {q: pieces for q, (_, pieces) in best.items()}


TIMING_BUDGET_S = 0.1  # a kernel timed this long in all (two calls at least) has been timed enough


def _time(fn, repeats: int) -> float:
    """The fastest of `repeats` calls after a warm-up (noise on a shared machine only adds time), or
    of fewer calls, two at least, once they took TIMING_BUDGET_S: a product that long (a wide head,
    many rows) varies little between calls."""
    fn()
    times: list[float] = []
    while len(times) < repeats and (len(times) < 2 or sum(times) < TIMING_BUDGET_S):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def measure_kernels(shape: tuple[int, int], dtype=torch.float32, device="cpu", qs=MEASURED_Q, repeats: int = 5, kernels=LAYER_KERNELS) -> dict[tuple[str, int], float]:
    """Seconds per product of every kernel for every q in `qs`, for a weight of `shape`
    [out, in] streamed from memory: the timing runs over enough random weights to exceed 64 MB."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    n_copies = max(1, -(-64 * 2**20 // (shape[0] * shape[1] * torch.finfo(dtype).bits // 8)))
    weights = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(n_copies)]
    copies = {name: [WEIGHT_COPIES[name](w) for w in weights] for name in kernels if name in WEIGHT_COPIES}
    costs = {}
    for q in qs:
        h = torch.randn(q, shape[1], generator=gen).to(device=device, dtype=dtype)
        for name in kernels:
            if name == "vm" and q > VM_MAX_Q:
                continue
            fn, ws = KERNELS[name], copies.get(name, weights)
            costs[(name, q)] = _time(lambda: [fn(w, h) for w in ws], repeats) / n_copies
    return costs


def _plan_file(shape, dtype, device, kernels=LAYER_KERNELS) -> Path:
    head = f"head{len(kernels)}-" if "vm" in kernels else ""
    key = f"v{PLAN_VERSION}-{head}{shape[0]}x{shape[1]}-{dtype}-{torch.device(device).type}-t{torch.get_num_threads()}-torch{torch.__version__}"
    return cache_root() / "kernels" / f"{file_name(key)}.json"


def load_or_measure_costs(shape, dtype=torch.float32, device="cpu", verbose: bool = True, kernels=LAYER_KERNELS) -> dict[tuple[str, int], float]:
    """Measured kernel costs for this weight shape on this machine (measured once, then read)."""
    path = _plan_file(tuple(shape), dtype, device, kernels)
    with locked(path):  # two processes starting at once time the kernels once
        if path.exists():
            try:
                rows = json.loads(path.read_text())["costs"]
                return {(r["kernel"], r["q"]): r["seconds"] for r in rows}
            except (ValueError, KeyError, TypeError):
                pass  # a damaged file: measure again
        if verbose:
            print(f"specprobe: timing matrix kernels for a {shape[0]}x{shape[1]} weight (once per machine)", file=sys.stderr)
        costs = measure_kernels(tuple(shape), dtype, device, kernels=kernels)
        rows = [{"kernel": k, "q": q, "seconds": s} for (k, q), s in sorted(costs.items(), key=lambda x: (x[0][1], x[0][0]))]
        atomic_write(path, json.dumps({"shape": list(shape), "costs": rows}, indent=1), lock=False)  # the lock is held
        return costs


def tuned_plan(weight: torch.Tensor, q_max: int = max(MEASURED_Q)) -> dict[int, list[Piece]]:
    """The per-q plan for this weight's shape on this machine; {} (always `linear`) off the CPU."""
    if weight.device.type != "cpu":
        return {}
    return plan_rows(load_or_measure_costs(tuple(weight.shape), weight.dtype, weight.device), q_max)


def project(weight: torch.Tensor, h: torch.Tensor, plan: dict[int, list[Piece]], copy: torch.Tensor | None = None) -> torch.Tensor:
    """h [q, in] @ weight[out, in].T -> [q, out], following plan[q] (F.linear when q has no plan).
    copy: the weight in the layout of the plan's copy kernel (`vm`: [in, out]; `packed`: oneDNN's)."""
    pieces = plan.get(h.shape[0])
    if not pieces:
        return F.linear(h, weight)
    out, start = [], 0
    for p in pieces:
        rows = h[start : start + p.rows]
        if p.run_as > p.rows:
            rows = torch.cat([rows, rows[-1:].expand(p.run_as - p.rows, -1)])
        out.append(KERNELS[p.kernel](copy if p.kernel in WEIGHT_COPIES else weight, rows)[: p.rows])
        start += p.rows
    return torch.cat(out) if len(out) > 1 else out[0].contiguous()


class PlannedLinear(nn.Module):
    """A drop-in for nn.Linear that runs `project` with its weight's plan."""

    def __init__(self, linear: nn.Linear, plan: dict[int, list[Piece]]):
        super().__init__()
        self.weight = linear.weight  # shared with the original module
        self.bias = linear.bias
        self.plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] not in self.plan:
            return F.linear(x, self.weight, self.bias)
        y = project(self.weight, rows, self.plan)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def planned_decoder(decoder: nn.Module) -> nn.Module:
    """A copy of `decoder` (parameters and buffers shared, not copied) whose nn.Linear layers run
    their measured plans; the original module is left as it was. Off the CPU the copy keeps
    transformers' F.linear (no plans are measured there) but is still a copy with its own config,
    so the engine can set its attention without touching the user's model."""
    memo = {id(t): t for t in [*decoder.parameters(), *decoder.buffers()]}
    copy_ = copy.deepcopy(decoder, memo)
    if next(decoder.parameters()).device.type != "cpu":
        return copy_
    plans: dict[tuple, dict] = {}
    for _name, module in list(copy_.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and min(child.weight.shape) >= 64:  # not LoRA's thin factors
                key = (tuple(child.weight.shape), child.weight.dtype)
                if key not in plans:
                    plans[key] = tuned_plan(child.weight)
                setattr(module, child_name, PlannedLinear(child, plans[key]))
    return copy_


def _plan_cost(pieces: list[Piece], costs: dict[tuple[str, int], float]) -> float:
    return sum(costs[(p.kernel, p.run_as)] for p in pieces)


def head_timings(weight: torch.Tensor) -> dict[tuple[str, int], float]:
    """Measured seconds per (kernel, q) for this head's shape on this machine (measured once, then read)."""
    return load_or_measure_costs(tuple(weight.shape), weight.dtype, weight.device, kernels=head_kernels(weight.dtype, weight.device))


def head_plan(weight: torch.Tensor, q_max: int = max(MEASURED_Q), costs: dict[tuple[str, int], float] | None = None) -> tuple[dict[int, list[Piece]], str | None]:
    """(plan, the weight copy it reads: "vm", "packed" or None) for a vocabulary head on this machine.

    A copy of the head in another layout can be much faster: `vm` (one row times the transposed
    weight) streams a wide head faster for a single row; `packed` (oneDNN's blocked layout,
    `torch.ops.mkldnn._linear_pointwise`) matches `vm` at one row and can be the fastest for
    several (docs/engine-measurements.md). A copy costs the
    head's memory again, so at most one is kept, and only where it cuts the one-row product or the
    sum over COPY_QS rows by 15 % or more; of two such copies the one with the smaller sum."""
    if weight.device.type != "cpu":
        return {}, None
    costs = head_timings(weight) if costs is None else costs

    def option(kind: str | None) -> tuple[dict[int, list[Piece]], float, float]:
        allowed = {k: v for k, v in costs.items() if k[0] not in WEIGHT_COPIES or k[0] == kind}
        plan = plan_rows(allowed, q_max)
        return plan, _plan_cost(plan[1], allowed), sum(_plan_cost(plan[q], allowed) for q in COPY_QS)

    plain_plan, plain_one, plain_sum = option(None)
    best = (plain_plan, None, plain_sum)
    for kind in sorted({k for k, _ in costs if k in WEIGHT_COPIES}):
        plan, one, total = option(kind)
        if (one < COPY_GAIN * plain_one or total < COPY_GAIN * plain_sum) and total < best[2]:
            best = (plan, kind, total)
    return best[0], best[1]


def head_costs(plan: dict[int, list[Piece]], costs: dict[tuple[str, int], float]) -> dict[str, dict[int, float]]:
    """Seconds per product for a head from its kernel timings: {"plan": {q: the plan's cost},
    "mm": {q: `mm`'s cost}}."""
    return {
        "plan": {q: _plan_cost(pieces, costs) for q, pieces in plan.items()},
        "mm": {q: c for (k, q), c in costs.items() if k == "mm"},
    }


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference tensors, which keep none."""
    return None if t.is_inference() else t._version


class LMHead:
    """logits = softcap(h @ W.T) for the rows asked, with a per-q kernel plan ({}: always `linear`)."""

    def __init__(self, weight: torch.Tensor, softcap: float | None = None, plan: dict[int, list[Piece]] | None = None, copy: str | None = None, costs: dict | None = None):
        self.weight = weight  # [vocab, hidden]: the model's own tensor, not a copy
        self.copy_kind = copy  # None, "vm" or "packed": the plan's kernel that reads a copy of the weight
        self.copy = WEIGHT_COPIES[copy](weight) if copy else None  # the weight in that kernel's layout
        self._copied_version = _version(weight)  # an in-place change of the weight renews the copy
        self.softcap = softcap
        self.plan = plan or {}
        self.costs = costs or {}  # head_costs(): measured seconds per q, which say when the reduced head pays
        self.reduced_ids: torch.Tensor | None = None  # [n_reduced]
        self.reduced_weight: torch.Tensor | None = None  # [n_reduced, hidden]

    @classmethod
    def tuned(cls, weight: torch.Tensor, softcap: float | None) -> "LMHead":
        if weight.device.type != "cpu":  # no timings off the CPU: transformers' F.linear
            return cls(weight, softcap)
        timings = head_timings(weight)
        plan, copy = head_plan(weight, costs=timings)
        return cls(weight, softcap, plan, copy, head_costs(plan, timings))

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [q, hidden] -> logits [q, vocab] (float32)."""
        if torch.is_grad_enabled() and (hidden.requires_grad or self.weight.requires_grad):
            # training through the head: autograd's own kernel (the packed op has no backward, and a
            # detached copy would carry no gradient to the weight)
            return self._cap(F.linear(hidden, self.weight).float())
        if self.copy is not None and _version(self.weight) != self._copied_version:
            self.copy, self._copied_version = WEIGHT_COPIES[self.copy_kind](self.weight), _version(self.weight)
        return self._cap(project(self.weight, hidden, self.plan, self.copy).float())

    # -- reduced head for draft-only rows ------------------------------------------------------
    def set_reduced_vocabulary(self, ids: list[int] | None) -> None:
        if not ids:
            self.reduced_ids = self.reduced_weight = None
            return
        self.reduced_ids = torch.tensor(sorted(set(ids)), device=self.weight.device)
        self.reduced_weight = self.weight.detach().index_select(0, self.reduced_ids)  # a copy of those rows

    def reduced_pays(self, n_full: int, n_draft: int, n_reduced: int | None = None) -> bool:
        """Whether scoring n_draft draft-only rows on a reduced head of n_reduced tokens (default:
        the one set now), apart from the n_full rows that get the full head, is cheaper than one
        full product over all of them, by the measured costs: plan(n_full) + mm(n_draft) x (reduced
        share of the vocabulary) + writing the -inf logits, against plan(n_full + n_draft), with a
        margin of REDUCED_GAIN. False without costs or without a reduced vocabulary."""
        plan, mm = self.costs.get("plan", {}), self.costs.get("mm", {})
        if n_reduced is None:
            n_reduced = 0 if self.reduced_weight is None else self.reduced_weight.shape[0]
        if not n_reduced or not n_draft or n_full + n_draft not in plan or n_full not in plan:
            return False
        mm_q = min((q for q in mm if q >= n_draft), default=None)
        if mm_q is None:
            return False
        vocab = self.weight.shape[0]
        fill = n_draft * vocab * 4 / FILL_BYTES_PER_S  # the [n_draft, vocab] float32 logits, mostly -inf
        split = plan[n_full] + mm[mm_q] * n_reduced / vocab + fill
        return split < REDUCED_GAIN * plan[n_full + n_draft]

    def reduced(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [q, hidden] -> logits [q, vocab] where only the reduced vocabulary is scored
        (the other entries are -inf); the full head when no reduced vocabulary is set."""
        if self.reduced_weight is None:
            return self(hidden)
        part = self._cap(torch.mm(self.reduced_weight, hidden.T).T.float())  # [q, n_reduced]: `mm`, fast for any q
        full = torch.full((hidden.shape[0], self.weight.shape[0]), float("-inf"), device=hidden.device)
        full[:, self.reduced_ids] = part
        return full


def plan_summary(plan: dict[int, list[Piece]], qs) -> dict[int, list[dict]]:
    return {q: [asdict(p) for p in plan.get(q, [])] for q in qs}
