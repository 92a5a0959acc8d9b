"""Layout conversions shared by the ADM-family converters (docs/models.md#upstream-checkpoints).

This package's attention orders the 3C output rows of ``qkv`` as (three, heads, head_dim) ("three" outermost,
`restore.engine.networks.layers.AttentionBlock`). guided-diffusion's legacy attention (ADM 256, DPS, I2SB) reads
them as (heads, three, head_dim) and NVlabs EDM's as (heads, head_dim, three); a row permutation makes them equal.
"""

from __future__ import annotations

import torch

QKV_ORDERS = ("three-heads-dim", "heads-three-dim", "heads-dim-three")


def qkv_rows_to_native(t: torch.Tensor, heads: int, order: str) -> torch.Tensor:
    """Rows of a ``qkv`` weight or bias (3C rows first) reordered from ``order`` to (three, heads, head_dim)."""
    if order not in QKV_ORDERS:
        raise ValueError(f"unknown qkv order {order!r}; known: {', '.join(QKV_ORDERS)}")
    rows, rest = t.shape[0], t.shape[1:]
    if rows % (3 * heads):
        raise ValueError(f"{rows} qkv rows do not split into 3 x {heads} heads")
    d = rows // (3 * heads)
    if order == "heads-three-dim":
        t = t.reshape(heads, 3, d, *rest).transpose(0, 1)
    elif order == "heads-dim-three":
        t = t.reshape(heads, d, 3, *rest).permute(2, 0, 1, *range(3, 3 + len(rest)))
    return t.reshape(rows, *rest).contiguous()
