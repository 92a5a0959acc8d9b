"""Box inpainting operators: a fixed (by default centred) box and a box placed per image at random.

Both are the linear masking ``A x = m * x`` with ``m`` boolean, ``True`` = observed: ``y`` keeps the
observed pixels and holds 0 in the hole (the fill value never enters a metric, docs/design.md#metrics).
``A`` is an orthogonal projection, so ``adjoint = pinv = forward`` and
``project(x, y) = (1 - m) x + m y`` (replacement, as in the consistency-model inpainting of
Song et al. 2023, Algorithm 4). ``op.mask`` is ``(1 or B, 1, H, W)`` for the last image size seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from operators.base import Operator, Param
from operators.registry import register_operator
from operators.utils import Generator, rand


def _hole(shape: Sequence[int], tops: torch.Tensor, lefts: torch.Tensor, size: int) -> torch.Tensor:
    """Observed-pixel mask ``(N, 1, H, W)`` with a ``size`` x ``size`` hole at ``(tops[n], lefts[n])``."""
    h, w = shape[-2:]
    rows = torch.arange(h, device=tops.device)
    cols = torch.arange(w, device=tops.device)
    in_rows = (rows >= tops[:, None]) & (rows < tops[:, None] + size)  # (N, H)
    in_cols = (cols >= lefts[:, None]) & (cols < lefts[:, None] + size)  # (N, W)
    return ~(in_rows[:, :, None] & in_cols[:, None, :])[:, None]


class _Masking(Operator):
    """Shared linear algebra of the masking operators; subclasses provide :meth:`mask_for`."""

    linear = True
    mask: torch.Tensor | None = None

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask_for(x), x, x.new_zeros(()))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self(y)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self(y)

    def measure(self, x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """Masked image plus noise on the observed pixels only (the hole stays 0)."""
        return self(super().measure(x, generator))


@register_operator("box")
class Box(_Masking):
    """Box inpainting: a size x size hole, centred unless top/left are given (I2SB 'center' task)."""

    PARAMS = (
        Param("size", int, help="side of the square hole in pixels", low=1),
        Param("top", int, None, "first hole row (default: centred)", low=0, nullable=True),
        Param("left", int, None, "first hole column (default: centred)", low=0, nullable=True),
    )

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size, top, left = self.params["size"], self.params["top"], self.params["left"]
        top = (h - size) // 2 if top is None else top
        left = (w - size) // 2 if left is None else left
        if top + size > h or left + size > w:
            raise ValueError(f"{self.spec}: box rows [{top}, {top + size}) x cols [{left}, {left + size}) "
                             f"does not fit in a {h}x{w} image")
        if self.mask is None or self.mask.shape[-2:] != (h, w) or self.mask.device != x.device:
            t = torch.tensor([top], device=x.device)
            self.mask = _hole((h, w), t, t.new_tensor([left]), size)
        return self.mask


@register_operator("randbox")
class RandBox(_Masking):
    """Box inpainting with a size x size hole placed uniformly at random per image (DPS 'box' task).

    The boxes are drawn by :meth:`sample_mask` (called by :meth:`measure`) from the per-image
    generators, before any noise, so image i's box depends only on its own generator; the operator
    then keeps them (``op.boxes``: (B, 2) long tensor of top, left; ``op.mask``: (B, 1, H, W)) and
    ``op(x)``, ``project``, ``pinv`` use them until the next draw. Restore with the same ``op``
    object that measured, or redraw with generators seeded the same way.
    """

    PARAMS = (
        Param("size", int, help="side of the square hole in pixels", low=1),
        Param("margin", int, 0, "minimum distance of the hole from the image border", low=0),
    )
    boxes: torch.Tensor | None = None

    def sample_mask(self, shape: Sequence[int], generator: Generator = None, device=None) -> torch.Tensor:
        """Draw one box per image of ``shape`` (B, C, H, W); set and return ``op.mask``."""
        b, (h, w) = shape[0], shape[-2:]
        size, margin = self.params["size"], self.params["margin"]
        if size + 2 * margin > min(h, w):
            raise ValueError(f"{self.spec}: a {size}-pixel box (margin {margin}) does not fit in a {h}x{w} image")
        u = rand((b, 2), generator, device=device, dtype=torch.float64)
        span = torch.tensor([h, w], device=u.device) - size - 2 * margin + 1
        self.boxes = (u * span).floor().long() + margin
        self.mask = _hole((h, w), self.boxes[:, 0], self.boxes[:, 1], size)
        return self.mask

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            raise ValueError(f"{self.spec}: no boxes drawn yet; call op.measure(x, generator) or op.sample_mask first")
        if self.mask.shape[-2:] != x.shape[-2:] or self.mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"{self.spec}: boxes were drawn for images {tuple(self.mask.shape)} "
                             f"but got {tuple(x.shape)}")
        return self.mask.to(x.device)

    def measure(self, x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """Draw new boxes from ``generator`` (one per image), then mask and add noise from the same generator."""
        self.sample_mask(x.shape, generator, device=x.device)
        return super().measure(x, generator)
