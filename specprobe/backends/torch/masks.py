"""Additive 4-D attention masks for a Hugging Face model's forward, from a `Layout`.

transformers' models take a 4-D additive `attention_mask` ([batch, 1, q, keys]: 0 where a row may
look, the dtype's minimum where it may not) and explicit `position_ids`; that is how a tree
reaches an unmodified model (Medusa / SpecInfer tree attention). Models with sliding-window
layers get a second mask that also hides keys `sliding_window` or more positions behind the query.
"""

from __future__ import annotations

import torch

from ...engine.tree import Layout, rows_structure


def attention_masks(
    layout: Layout,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Additive 4-D masks for the target's forward and the rows' position ids.

    Returns (full_mask [1, 1, q, past_len + q], sliding_mask or None, position_ids [1, q]).
    The sliding mask also hides keys `sliding_window` or more positions behind the query, as
    transformers' own sliding-window layers do (`kv_idx > q_idx - sliding_window`).
    """
    vis, off = rows_structure(layout)
    q = vis.shape[0]
    positions = off + past_len  # [q]
    allowed = torch.cat([torch.ones(q, past_len, dtype=torch.bool), vis], dim=1)  # [q, past+q]
    full, sliding = additive_masks(allowed, positions, torch.cat([torch.arange(past_len), positions]), dtype, device, sliding_window)
    return full, sliding, positions[None].to(device)


def additive_masks(
    allowed: torch.Tensor,  # [q, k] bool: query row r may attend to key k
    positions: torch.Tensor,  # [q] long: the query rows' positions
    key_positions: torch.Tensor,  # [k] long
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(full [1, 1, q, k], sliding [1, 1, q, k] or None) additive masks from a boolean one."""
    neg = torch.finfo(dtype).min

    def additive(a: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(a.shape, dtype=dtype)
        m.masked_fill_(~a, neg)
        return m[None, None].to(device)

    sliding = None
    if sliding_window is not None:
        near = key_positions[None, :] > positions[:, None] - sliding_window
        sliding = additive(allowed & near)
    return additive(allowed), sliding
