"""The cost curve T(q) of a verification forward, its parts, and the roofline bound.

`profile(target, ...)` times one engine forward with q new rows (q = 1: a decoding step; q > 1:
a star of q - 1 draft nodes under the root, so the 4-D tree-mask path runs) over a KV cache of
`context` tokens, and splits it into

    embedding     the input-embedding lookup
    layers        the decoder (every transformer layer, the masks, the final norm)
    lm head       logits for the rows that need them (the engine's per-q kernel plan)
    overhead      the rest of the forward: building masks and positions, Python
    cache         (after the forward, not in T(q)) keeping the accepted rows, `kv_cache.keep_rows`

The roofline bound of a forward is max(bytes moved / bandwidth, flops / peak), with this machine's
memory bandwidth (a streaming reduction over a buffer far larger than the caches) and fp32 matmul
peak MEASURED here, the weights streamed once per forward, the KV cache read once, and
2 flops per weight per row plus attention's 4 * context * hidden per row and layer.

`cost_curve(target)` returns T(q)/T(1) for q = 1..64, measured once per model, device and thread
count and cached on disk; the hardware-aware tree budget (`--budget auto`) reads it.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from ...engine.cost_curve import forward_times, measure_cost_curve, prefilled, star
from ...store import atomic_write, cache_root, file_name
from .kv_cache import cache_kwargs, cache_length, keep_rows

PROFILE_Q = (1, 2, 4, 8, 16, 32, 64)
CURVE_VERSION = 3  # bumped when the engine's forward changes, so saved curves are measured again


@dataclass
class Machine:
    bandwidth_gbs: float  # streaming read, GB/s
    peak_gflops: float  # fp32 matmul, GFLOP/s
    threads: int


@dataclass
class ProfileRow:
    q: int
    total_ms: float
    embedding_ms: float
    layers_ms: float
    head_ms: float
    cache_ms: float
    overhead_ms: float
    bound_ms: float


@dataclass
class Profile:
    model: str
    device: str
    context: int
    machine: Machine
    weight_bytes: int
    rows: list[ProfileRow] = field(default_factory=list)

    def ratio(self, q: int) -> float:
        t = {r.q: r.total_ms for r in self.rows}
        return t[q] / t[self.rows[0].q]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        m = self.machine
        lines = [
            f"{self.model} on {self.device} ({m.threads} threads), KV cache {self.context} tokens; "
            f"measured {m.bandwidth_gbs:.1f} GB/s, {m.peak_gflops:.0f} GFLOP/s; weights {self.weight_bytes / 1e6:.0f} MB",
            "",
            "| q | T(q) ms | T(q)/T(1) | embedding | layers | lm head | cache | overhead | roofline ms | roofline / T(1) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        t1 = self.rows[0].total_ms
        for r in self.rows:
            lines.append(
                f"| {r.q} | {r.total_ms:.1f} | {r.total_ms / t1:.2f} | {r.embedding_ms:.1f} | {r.layers_ms:.1f} | "
                f"{r.head_ms:.1f} | {r.cache_ms:.2f} | {r.overhead_ms:.1f} | {r.bound_ms:.1f} | {r.bound_ms / t1:.2f} |"
            )
        return "\n".join(lines)


def _median_time(fn, repeats: int, sync) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure_machine(device: str = "cpu") -> Machine:
    """Memory bandwidth (sum over 512 MB) and fp32 matmul peak (2048^3), measured now."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    buf = torch.ones(128 * 2**20, device=device)  # 512 MB of float32
    bw = buf.numel() * 4 / _median_time(lambda: buf.sum(), 5, sync) / 1e9
    buf = None  # free the 512 MB before the matmul
    a = torch.randn(2048, 2048, device=device)
    peak = 2 * 2048**3 / _median_time(lambda: a @ a, 5, sync) / 1e9
    return Machine(bw, peak, torch.get_num_threads())


def _weight_bytes(model) -> int:
    """Bytes streamed per forward: every parameter except the input-embedding table (only its rows
    are gathered), plus the LM head when it is tied to that table."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    if head is emb:
        total += head.numel() * head.element_size()
    return total


def _flops(model, q: int, context: int) -> float:
    emb = model.get_input_embeddings().weight
    matmul_params = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not emb)
    head = model.get_output_embeddings().weight
    if head is emb:
        matmul_params += head.numel()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    attn = 4 * context * cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    return 2 * matmul_params * q + attn * cfg.num_hidden_layers * q


def _kv_bytes(target, context: int) -> int:
    cfg = target.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * context * target.dtype.itemsize


@torch.inference_mode()
def profile(target, name: str, qs=PROFILE_Q, context: int = 300, repeats: int = 7, progress=None) -> Profile:
    device = target.device.type
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    machine = measure_machine(str(target.device))
    cache, last = prefilled(target, context)
    prefix = cache_length(cache)
    model = target.model
    wbytes = _weight_bytes(model)
    result = Profile(name, device, context, machine, wbytes)
    totals = forward_times(target, qs, context, repeats)
    for q in qs:
        tree = star(q)
        ids = torch.tensor([[last] + tree.tokens], device=target.device)

        def layers():
            target.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwargs(target.decoder, cache))
            keep_rows(cache, prefix, [])

        def kept_one():  # a forward's cache growth followed by keeping one row, as after a real step
            target.forward(cache, [last], tree)
            t0 = time.perf_counter()
            keep_rows(cache, prefix, [0])
            elapsed = time.perf_counter() - t0
            keep_rows(cache, prefix, [])
            return elapsed

        total = totals[q]
        embedding = _median_time(lambda: target.embedding(ids), repeats, sync)
        _, embeds, mask, positions = target.inputs(prefix, [last], tree)
        trim = _median_time(lambda: keep_rows(cache, prefix, []), repeats, sync)
        layers_s = _median_time(layers, repeats, sync) - trim
        hidden = torch.randn(q, embeds.shape[-1], device=target.device, dtype=embeds.dtype)
        head = _median_time(lambda: target.head(hidden), repeats, sync)
        cache_s = statistics.median(kept_one() for _ in range(repeats))
        bytes_moved = wbytes + _kv_bytes(target, context)
        bound = max(bytes_moved / (machine.bandwidth_gbs * 1e9), _flops(model, q, context) / (machine.peak_gflops * 1e9))
        overhead = total - embedding - layers_s - head
        ms = [x * 1e3 for x in (total, embedding, layers_s, head, cache_s, overhead, bound)]
        result.rows.append(ProfileRow(q, *ms))
        if progress is not None:
            progress(q)
    return result


# -- the cost curve the tree budget reads ---------------------------------------------------------
def _curve_file(target):
    w = target.head.weight
    key = f"c{CURVE_VERSION}-{target.config.model_type}-{target.config.num_hidden_layers}x{target.config.hidden_size}-v{w.shape[0]}-{target.dtype}-{target.device.type}-t{torch.get_num_threads()}"
    return cache_root() / "cost_curves" / f"{file_name(key)}.json"


def save_cost_curve(target, times: dict[int, float]) -> None:
    atomic_write(_curve_file(target), json.dumps({"seconds": {str(q): t for q, t in sorted(times.items())}}, indent=1))
    target.set_cost_curve(times)


def cost_curve(target, measure_if_missing: bool = True) -> dict[int, float] | None:
    """Seconds per step for q in CURVE_Q (read from disk, or measured once and saved)."""
    path = _curve_file(target)
    if path.exists():
        try:
            return {int(q): float(t) for q, t in json.loads(path.read_text())["seconds"].items()}
        except (ValueError, KeyError, TypeError):
            pass
    if not measure_if_missing:
        return None
    times, is_steady = measure_cost_curve(target)
    if is_steady:  # else this process uses it, and the next one measures again
        save_cost_curve(target, times)
    return times
