"""Restore images of any size with a fixed-size network: overlapping tiles blended without seams.

A network restores images of its native size ``T`` only. For operators that act locally (JPEG works
on 8x8 blocks / 16x16 MCUs, downsampling on K x K neighbourhoods) an image of another size can be
restored tile by tile: the measurement ``y`` is cut into overlapping tiles, each tile is restored as
an image of its own, and the restored tiles are blended with weights that sum to one at every pixel.

Geometry (all in the measurement domain; ``scale`` maps it to the output domain):

* tile side ``t = T / scale`` (``down:factor=K`` tiles ``y`` at ``T / K`` and restores tiles of
  ``T``; same-size operators have ``scale = 1``);
* tile starts are multiples of ``align`` (JPEG: 16, the 4:2:0 MCU, so every tile holds whole codec
  blocks exactly as in the full image), the first tile starts at 0 and the last one ends at the
  image border, neighbouring tiles overlap by at least ``overlap``;
* images smaller than a tile, or whose side is not ``t`` plus a multiple of ``align``, are
  **padded** by edge replication (as libjpeg pads partial MCUs) and the output is cropped back,
  so every size is accepted and every pixel is covered.

Blending: each output tile carries the separable weight ``w(i) w(j)`` with ``w`` a raised-cosine
ramp ``sin^2(pi/2 (i + 1/2) / r)`` over the first and last ``r = overlap * scale`` pixels and 1
in between (positive everywhere); the result is ``sum_k w_k x_k / sum_k w_k``. Weights therefore sum
to one at every pixel, a method that acts on each pixel's neighbourhood only is reproduced exactly,
and where two tiles disagree the output moves between them gradually across the overlap instead of
jumping at a seam.

Which operators tile is :func:`tile_rule`; masks (``box``, ``randbox``) are not local -- the hole
may span tiles -- so they do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["TileRule", "blend_window", "padded_length", "tile_rule", "tile_starts", "tiled_restore"]


@dataclass(frozen=True)
class TileRule:
    """How an operator tiles: output pixels per measurement pixel, and the grid tile starts snap to."""

    scale: int = 1
    align: int = 1


def tile_rule(op) -> TileRule | None:
    """The tiling rule of operator ``op``, or None when it does not act locally (masks)."""
    if op.name == "jpeg":
        return TileRule(scale=1, align=16)  # whole 4:2:0 MCUs (two 8x8 grey blocks)
    if op.name == "down":
        return TileRule(scale=op.params["factor"], align=1)
    return None


def padded_length(length: int, tile: int, align: int = 1) -> int:
    """Smallest ``L >= max(length, tile)`` with ``L - tile`` a multiple of ``align``."""
    return tile + align * math.ceil(max(length - tile, 0) / align)


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Starts of tiles of side ``tile`` covering ``[0, length)`` with overlaps of at least ``overlap``.

    ``length`` must be :func:`padded_length` (``>= tile``, ``length - tile`` a multiple of ``align``).
    Starts are multiples of ``align``, spread as evenly as the grid allows, the first is 0, the last
    ``length - tile``; the fewest tiles that keep every overlap ``>= overlap`` are used.
    """
    if length < tile or (length - tile) % align:
        raise ValueError(f"length {length} must be >= tile {tile} and differ from it by a multiple of {align}")
    max_step = (tile - overlap) // align  # in units of align
    if overlap < 0 or max_step < 1:
        raise ValueError(f"overlap must be in [0, {tile - align}] for tiles of {tile} on a grid of {align}, "
                         f"got {overlap}")
    units = (length - tile) // align
    if units == 0:
        return [0]
    n = math.ceil(units / max_step) + 1
    # Rounded even spacing: every gap is floor or ceil of units / (n - 1) <= max_step.
    return [align * round(k * units / (n - 1)) for k in range(n)]


def blend_window(size: int, ramp: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """1-D blending weights: raised-cosine ramps over the first and last ``ramp`` samples, 1 between; all > 0."""
    w = torch.ones(size, device=device, dtype=torch.float64)
    ramp = min(ramp, size // 2)
    if ramp > 0:
        up = torch.sin(math.pi / 2 * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp).square()
        w[:ramp] = up.to(w.device)
        w[size - ramp:] = up.flip(0).to(w.device)
    return w.to(dtype)


def tiled_restore(
    restore: Callable[[torch.Tensor, Sequence[int]], torch.Tensor],
    y: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    rule: TileRule = TileRule(),
    batch_size: int = 16,
) -> torch.Tensor:
    """Restore one measurement ``y`` (1, C, h, w) tile by tile; returns (1, C', h * scale, w * scale).

    ``tile`` is the output-domain tile side (the network's native size; a multiple of ``rule.scale``),
    ``overlap`` the minimum overlap in measurement pixels. ``restore(y_tiles, keys)`` restores a batch
    of at most ``batch_size`` tiles ``(N, C, t, t)`` into ``(N, C', tile, tile)``; ``keys`` are the
    tiles' indices in row-major order, stable for a given image size (use them to seed per-tile
    randomness, so results do not depend on ``batch_size``).
    """
    if y.ndim != 4 or y.shape[0] != 1:
        raise ValueError(f"tiled_restore takes one image (1, C, h, w), got {tuple(y.shape)}")
    if tile % rule.scale:
        raise ValueError(f"tile {tile} is not a multiple of the operator's scale {rule.scale}")
    t, s = tile // rule.scale, rule.scale
    h, w = y.shape[-2:]
    big_h, big_w = padded_length(h, t, rule.align), padded_length(w, t, rule.align)
    y_pad = F.pad(y, (0, big_w - w, 0, big_h - h), mode="replicate") if (big_h, big_w) != (h, w) else y
    boxes = [(r, c) for r in tile_starts(big_h, t, overlap, rule.align)
             for c in tile_starts(big_w, t, overlap, rule.align)]

    num = den = None
    window = None
    for first in range(0, len(boxes), batch_size):
        keys = list(range(first, min(first + batch_size, len(boxes))))
        tiles = torch.cat([y_pad[..., r:r + t, c:c + t] for r, c in (boxes[k] for k in keys)])
        out = restore(tiles, keys)
        if num is None:
            num = out.new_zeros((1, out.shape[1], big_h * s, big_w * s))
            den = out.new_zeros((1, 1, big_h * s, big_w * s))
            ramp = blend_window(tile, overlap * s, device=out.device, dtype=out.dtype)
            window = ramp[:, None] * ramp[None, :]
        for k, x_tile in zip(keys, out):
            r, c = boxes[k][0] * s, boxes[k][1] * s
            num[0, :, r:r + tile, c:c + tile] += window * x_tile
            den[0, 0, r:r + tile, c:c + tile] += window
    return (num / den)[..., : h * s, : w * s]
