"""Box inpainting operators: a fixed (by default centred) box and a box placed per image at random.

Both are the linear masking ``A x = m * x`` with ``m`` boolean, ``True`` = observed: ``y`` keeps the
observed pixels and holds 0 in the hole (the fill value never enters a metric, docs/design.md#metrics).
``A`` is an orthogonal projection, so ``adjoint = pinv = forward`` and
``project(x, y) = (1 - m) x + m y`` (replacement, as in the consistency-model inpainting of
Song et al. 2023, Algorithm 4). ``op.mask_for(x)`` is the observed-pixel mask ``(1 or B, 1, H, W)``
for images shaped like ``x``.

Operators never change after construction. The random boxes of ``randbox`` are data: ``op.draw(shape,
generator)`` draws them (:meth:`RandBox.draw_boxes`) and returns a new ``randbox`` operator holding them
(:meth:`RandBox.with_boxes`); that operator measures, projects and restores the batch.
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

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """Observed-pixel mask (bool, True = observed) ``(1 or B, 1, H, W)`` on ``x``'s device."""
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
        t = torch.tensor([top], device=x.device)
        return _hole((h, w), t, t.new_tensor([left]), size)


@register_operator("randbox")
class RandBox(_Masking):
    """Box inpainting with a size x size hole placed uniformly at random per image (DPS 'box' task).

    ``RandBox(size=S)`` is the family; ``op.draw(x.shape, generator)`` returns the operator of one batch:
    the same spec, plus ``boxes`` ((B, 2) long tensor of top, left rows) and ``image_size`` (H, W).
    Image i's box depends only on its own generator (``generator`` may be a list with one per image)
    and is drawn before any measurement noise, so ``op = op.draw(x.shape, g); y = op.measure(x, g)``
    draws boxes and noise in the same order from the same generators. Only an operator with boxes maps
    images; :meth:`with_boxes` rebuilds one from saved (or sliced) boxes.
    """

    PARAMS = (
        Param("size", int, help="side of the square hole in pixels", low=1),
        Param("margin", int, 0, "minimum distance of the hole from the image border", low=0),
    )

    def __init__(self, *, boxes: torch.Tensor | None = None, image_size: Sequence[int] | None = None,
                 **params) -> None:
        super().__init__(**params)
        if (boxes is None) != (image_size is None):
            raise ValueError(f"{self.spec}: give boxes and image_size together")
        self.boxes: torch.Tensor | None = None
        self.image_size: tuple[int, int] | None = None
        self._mask: torch.Tensor | None = None
        if boxes is not None:
            h, w = (int(s) for s in image_size)
            size = self.params["size"]
            boxes = torch.as_tensor(boxes).long().reshape(-1, 2).clone()
            if len(boxes) and (boxes.min() < 0 or boxes[:, 0].max() + size > h or boxes[:, 1].max() + size > w):
                raise ValueError(f"{self.spec}: boxes do not fit in a {h}x{w} image")
            self.boxes, self.image_size = boxes, (h, w)
            self._mask = _hole((h, w), boxes[:, 0], boxes[:, 1], size)

    def draw_boxes(self, shape: Sequence[int], generator: Generator = None, device=None) -> torch.Tensor:
        """One box per image of ``shape`` (B, C, H, W): (B, 2) long tensor of (top, left), from ``generator``."""
        b, (h, w) = shape[0], shape[-2:]
        size, margin = self.params["size"], self.params["margin"]
        if size + 2 * margin > min(h, w):
            raise ValueError(f"{self.spec}: a {size}-pixel box (margin {margin}) does not fit in a {h}x{w} image")
        u = rand((b, 2), generator, device=device, dtype=torch.float64)
        span = torch.tensor([h, w], device=u.device) - size - 2 * margin + 1
        return (u * span).floor().long() + margin

    def with_boxes(self, boxes: torch.Tensor, image_size: Sequence[int]) -> RandBox:
        """This operator's family with the given boxes ((B, 2) top, left) for images of ``image_size`` (H, W)."""
        return type(self)(boxes=boxes, image_size=image_size, **self.params)

    def draw(self, shape: Sequence[int], generator: Generator = None, device=None) -> RandBox:
        """The operator of a batch of ``shape``: new boxes from ``generator`` (see :meth:`draw_boxes`)."""
        return self.with_boxes(self.draw_boxes(shape, generator, device), shape[-2:])

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        if self._mask is None:
            raise ValueError(f"{self.spec}: no boxes drawn yet; use op = op.draw(x.shape, generator) first")
        if self._mask.shape[-2:] != x.shape[-2:] or self._mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"{self.spec}: boxes were drawn for images {tuple(self._mask.shape)} "
                             f"but got {tuple(x.shape)}")
        return self._mask.to(x.device)
