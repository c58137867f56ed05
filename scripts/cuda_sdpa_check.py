"""Does this GPU's memory-efficient SDPA kernel return wrong rows for broadcast keys/values?

The check behind specprobe/attention.py's choice (pytorch/pytorch#191937). With one key/value
head (Gemma3-270M), transformers' `repeat_kv` hands SDPA a stride-0 view of the cache; this script
feeds the EFFICIENT_ATTENTION kernel Gemma3-270M's attention shapes (4 query heads, 1 key/value
head, head_dim 256, a boolean tree-like mask over a cache of 500-560 positions) in two forms and
compares each with the MATH kernel in float32 on the same values:

    expanded   keys/values expanded to 4 heads with stride 0 (transformers' path)
    grouped    query heads folded into rows, keys/values as the cache holds them (specprobe's path)

    python scripts/cuda_sdpa_check.py            # prints the wrong cases per form and dtype

On an H100 (torch 2.11.0+cu130, 2026-11-26) the expanded form was wrong at 33 rows for every key
count tried (float32, max error 0.05; bfloat16, 11 key counts), and the grouped form never.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, KV_HEADS, HEAD_DIM = 4, 1, 256
ROWS = (1, 8, 17, 32, 33, 40)
KEYS = range(500, 561)


def tree_mask(rows: int, keys: int, device) -> torch.Tensor:  # [1, 1, rows, keys], True = attend
    mask = torch.ones(rows, keys, dtype=torch.bool, device=device)
    mask[:, keys - rows :] = torch.tril(torch.ones(rows, rows, dtype=torch.bool, device=device))
    mask[rows // 2 :, keys - rows] = False  # a branch: the later rows do not see the first node
    return mask[None, None]


def errors(rows: int, keys: int, dtype, gen) -> tuple[float, float]:
    """Max |EFFICIENT - MATH(float32)| for the expanded and the grouped forms."""
    dev = "cuda"
    query = torch.randn(1, HEADS, rows, HEAD_DIM, device=dev, generator=gen, dtype=dtype)
    key, value = torch.randn(2, 1, KV_HEADS, keys, HEAD_DIM, device=dev, generator=gen, dtype=dtype)
    mask = tree_mask(rows, keys, dev)
    k_exp, v_exp = (t.expand(1, HEADS, keys, HEAD_DIM) for t in (key, value))  # stride 0 over heads
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(query.float(), k_exp.float(), v_exp.float(), attn_mask=mask)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        expanded = F.scaled_dot_product_attention(query, k_exp, v_exp, attn_mask=mask)
        folded = query.reshape(1, KV_HEADS, HEADS // KV_HEADS * rows, HEAD_DIM)
        grouped = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask.repeat(1, 1, HEADS // KV_HEADS, 1))
    grouped = grouped.reshape(1, HEADS, rows, HEAD_DIM)
    return (expanded.float() - ref).abs().max().item(), (grouped.float() - ref).abs().max().item()


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (the CPU has no memory-efficient kernel)")
        return
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-3), (torch.bfloat16, 0.1)):
        wrong = {"expanded": [], "grouped": []}
        for keys in KEYS:
            for rows in ROWS:
                for form, err in zip(wrong, errors(rows, keys, dtype, gen)):
                    if err > tolerance:
                        wrong[form].append((rows, keys, round(err, 3)))
        for form, cases in wrong.items():
            where = f"rows {sorted({r for r, _, _ in cases})}, {len({k for _, k, _ in cases})} key counts, e.g. {cases[:3]}" if cases else "none"
            print(f"{str(dtype):15s} {form:9s} wrong (error > {tolerance}) in {len(cases)} of {len(KEYS) * len(ROWS)} cases: {where}")


if __name__ == "__main__":
    main()
