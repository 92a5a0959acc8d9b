"""Inpainting operators: a fixed (by default centred) box, a box placed per image at random, random pixels.

All are the linear masking ``A x = m * x`` with ``m`` boolean, ``True`` = observed: ``y`` keeps the
observed pixels and holds 0 in the hole (the fill value never enters a metric, docs/design.md#metrics).
``A`` is an orthogonal projection, so ``adjoint = pinv = forward`` and
``project(x, y) = (1 - m) x + m y`` (replacement, as in the consistency-model inpainting of
Song et al. 2023, Algorithm 4). ``op.mask_for(x)`` is the observed-pixel mask ``(1 or B, 1, H, W)``
for images shaped like ``x``.

Operators never change after construction. The random boxes of ``randbox`` and the random pixel masks of
``randmask`` are data: ``op.draw(shape, generator)`` draws them (:meth:`RandBox.draw_boxes`,
:meth:`RandMask.draw_mask`) and returns a new operator of the same spec holding them (:meth:`RandBox.with_boxes`,
:meth:`RandMask.with_mask`); that operator measures, projects and restores the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

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


class _DrawnMasking(_Masking):
    """A masking operator whose mask is random per image: ``draw`` returns a new operator holding it (``_mask``,
    ``(B, 1, H, W)``); the family itself (``_mask`` None) maps no images."""

    random = True
    DRAWN: ClassVar[str] = ""  # what draw draws, for messages

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self._mask: torch.Tensor | None = None

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        if self._mask is None:
            raise ValueError(f"{self.spec}: no {self.DRAWN} drawn yet; use op = op.draw(x.shape, generator) first")
        if self._mask.shape[-2:] != x.shape[-2:] or self._mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"{self.spec}: {self.DRAWN} were drawn for images {tuple(self._mask.shape)} "
                             f"but got {tuple(x.shape)}")
        return self._mask.to(x.device)


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
class RandBox(_DrawnMasking):
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
    DRAWN = "boxes"

    def __init__(self, *, boxes: torch.Tensor | None = None, image_size: Sequence[int] | None = None,
                 **params) -> None:
        super().__init__(**params)
        if (boxes is None) != (image_size is None):
            raise ValueError(f"{self.spec}: give boxes and image_size together")
        self.boxes: torch.Tensor | None = None
        self.image_size: tuple[int, int] | None = None
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


@register_operator("randmask")
class RandMask(_DrawnMasking):
    """Random pixel inpainting: each pixel (all channels together) is missing with probability p, per image.

    The random-mask inpainting of DPS (Chung et al., ICLR 2023, Sec. 4, experimental setup; their code masks
    the same pixels in all RGB channels) and DDRM (Kawar et al., NeurIPS 2022: H keeps the observed pixels, V = I,
    s = 1). Implemented: independent Bernoulli(p) per pixel, so the missing fraction is p on average
    (``randmask:p=0.7`` for the "70 % of pixels" protocol). Deviation: DPS's code removes exactly
    floor(p H W) pixels, with p drawn uniformly in ``mask_prob_range`` per image; here p is the spec's.

    Like :class:`RandBox`: ``op.draw(x.shape, generator)`` returns the batch's operator holding ``mask``
    ((B, 1, H, W) bool, True = observed); image i's mask depends only on its own generator and is drawn
    before any measurement noise. :meth:`with_mask` rebuilds an operator from saved (or sliced) masks.
    """

    PARAMS = (Param("p", float, help="probability that a pixel (all channels) is missing", low=0.0, high=1.0),)
    DRAWN = "masks"

    def __init__(self, *, mask: torch.Tensor | None = None, **params) -> None:
        super().__init__(**params)
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1] != 1:
                raise ValueError(f"{self.spec}: mask must be a (B, 1, H, W) bool tensor, got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            self._mask = mask.clone()

    @property
    def mask(self) -> torch.Tensor | None:
        """The drawn observed-pixel masks (B, 1, H, W), None for the family."""
        return self._mask

    def draw_mask(self, shape: Sequence[int], generator: Generator = None, device=None) -> torch.Tensor:
        """Observed-pixel masks (B, 1, H, W) for images of ``shape`` (B, C, H, W), from ``generator``."""
        b, (h, w) = shape[0], shape[-2:]
        return rand((b, 1, h, w), generator, device=device, dtype=torch.float64) >= self.params["p"]

    def with_mask(self, mask: torch.Tensor) -> RandMask:
        """This operator's family with the given observed-pixel masks (B, 1, H, W)."""
        return type(self)(mask=mask, **self.params)

    def draw(self, shape: Sequence[int], generator: Generator = None, device=None) -> RandMask:
        """The operator of a batch of ``shape``: new masks from ``generator`` (see :meth:`draw_mask`)."""
        return self.with_mask(self.draw_mask(shape, generator, device))
