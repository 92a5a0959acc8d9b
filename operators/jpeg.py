"""JPEG compression: the real codec (libjpeg through Pillow), its differentiable twin (kornia) and the
projection onto the quantisation constraint set.

The measurement ``op(x)`` encodes ``to_uint8(x)`` with Pillow at ``quality`` (baseline, libjpeg's
default 4:2:0 chroma subsampling) and decodes it back to [-1, 1]. Everything else models that
codec in the same coordinates libjpeg uses (ITU-T T.81 / JFIF):

* RGB -> YCbCr with the JFIF matrix on the 0..255 scale (+128 chroma offset);
* chroma downsampled by the 2x2 box average (libjpeg ``h2v2_downsample``) and, on decoding,
  upsampled by libjpeg's separable triangle filter (``h2v2_fancy_upsample``: 3/4, 1/4 taps, edge
  replicated);
* level shift -128, orthonormal 8x8 DCT-II per block, coefficient ``c`` quantised to
  ``q = round(c / Q)`` with the IJG tables of ITU-T T.81 Annex K scaled per quality exactly as
  libjpeg's ``jpeg_set_quality(quality, force_baseline=TRUE)`` (Pillow's ``quality=``).

:meth:`JPEG.project` is the projection onto the quantisation constraint set (QCS) of POCS
deblocking (Zakhor 1992; Reeve and Lim 1984; docs/design.md#jpeg-operator): every coefficient of ``x`` is
clipped into its cell ``[(q - 1/2) Q, (q + 1/2) Q]`` around the coefficient index ``q`` of ``y``
(recovered from the decoded ``y``; Pillow does not expose the file's coefficients), with a small
safety margin so that the result survives 8-bit rounding. On CIFAR-10 (x = blurred truth) 98 % of
images then reproduce ``y`` bit-exactly through the real codec at q10 and q20 (tests/test_jpeg.py).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from operators.base import Operator, Param
from operators.registry import register_operator
from operators.utils import from_uint8, from_unit, tensor_cache, to_uint8, to_unit

# ITU-T T.81 Annex K, Tables K.1 (luminance) and K.2 (chrominance), natural (row-major) order.
_LUMA_BASE = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
])
_CHROMA_BASE = torch.full((8, 8), 99)
_CHROMA_BASE[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])

# JFIF RGB -> YCbCr on the 0..255 scale (chroma offset 128 added separately).
_RGB_TO_YCC = torch.tensor([
    [0.299, 0.587, 0.114],
    [-0.168735892, -0.331264108, 0.5],
    [0.5, -0.418687589, -0.081312411],
], dtype=torch.float64)
_YCC_TO_RGB = torch.linalg.inv(_RGB_TO_YCC)
_YCC_OFFSET = torch.tensor([0.0, 128.0, 128.0], dtype=torch.float64)


def quantization_tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(luma, chroma) 8x8 int64 tables libjpeg uses at ``quality`` (``jpeg_quality_scaling`` then
    ``jpeg_add_quant_table`` with integer arithmetic and the baseline clip to [1, 255])."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return tuple(((base * scale + 50) // 100).clamp(1, 255) for base in (_LUMA_BASE, _CHROMA_BASE))


def _dct_matrix() -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * torch.pi / 16) * (2 / 8) ** 0.5
    d[0] /= 2**0.5
    return d  # orthonormal DCT-II: row k is basis function k


_DCT = _dct_matrix()


def _fancy_upsampling_matrix(n: int) -> torch.Tensor:
    """libjpeg's 1-D triangle upsampler (``2n x n``): out[2i] = 3/4 c[i] + 1/4 c[i-1],
    out[2i+1] = 3/4 c[i] + 1/4 c[i+1], edges replicated; the 2-D filter is separable."""
    u = torch.zeros(2 * n, n, dtype=torch.float64)
    i = torch.arange(n)
    u[2 * i, i] += 0.75
    u[2 * i, (i - 1).clamp(min=0)] += 0.25
    u[2 * i + 1, i] += 0.75
    u[2 * i + 1, (i + 1).clamp(max=n - 1)] += 0.25
    return u


@tensor_cache(64)
def _tables(quality: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2-D block DCT matrix kron(D, D), luma table, chroma table) on ``device`` in ``dtype``."""
    luma, chroma = quantization_tables(quality)
    return torch.kron(_DCT, _DCT).to(device, dtype), luma.to(device, dtype), chroma.to(device, dtype)


@tensor_cache(16)
def _colour(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(RGB -> YCbCr matrix, its inverse, (3, 1, 1) offset) on ``device`` in ``dtype``."""
    return tuple(t.to(device, dtype) for t in (_RGB_TO_YCC, _YCC_TO_RGB, _YCC_OFFSET[:, None, None]))


@tensor_cache(64)
def _fancy(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _fancy_upsampling_matrix(n).to(dtype=dtype, device=device)


@tensor_cache(64)
def _unfancy(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Moore-Penrose inverse (``n x 2n``) of the triangle upsampler: recovers a decoded chroma plane."""
    return torch.linalg.pinv(_fancy_upsampling_matrix(n)).to(dtype=dtype, device=device)


def _block_dct(p: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """(..., H, W) planes -> (..., H/8, W/8, 8, 8) orthonormal block DCT coefficients.
    ``d2 = kron(D, D)`` acts on row-major flattened 8x8 blocks (one GEMM instead of two)."""
    blocks = p.unflatten(-1, (-1, 8)).unflatten(-3, (-1, 8)).transpose(-3, -2)  # (..., H/8, W/8, 8, 8)
    return (blocks.flatten(-2) @ d2.T).unflatten(-1, (8, 8))


def _block_idct(c: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_block_dct`."""
    blocks = (c.flatten(-2) @ d2).unflatten(-1, (8, 8)).transpose(-3, -2)  # (..., H/8, 8, W/8, 8)
    return blocks.flatten(-4, -3).flatten(-2, -1)


@register_operator("jpeg")
class JPEG(Operator):
    """JPEG compression (libjpeg via Pillow, 4:2:0) at quality 1-100; non-linear, differentiable twin via kornia."""

    PARAMS = (Param("quality", int, help="JPEG quality factor (libjpeg / Pillow scale)", low=1, high=100),)

    @property
    def quality(self) -> int:
        return self.params["quality"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The real codec: Pillow encode + decode of ``to_uint8(x)``, one image at a time (1 or 3 channels)."""
        self._check_channels(x)
        images = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        decoded = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=self.quality)
            decoded.append(np.asarray(Image.open(buffer)).reshape(image.shape))
        y = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
        return from_uint8(y).to(device=x.device, dtype=x.dtype)

    def differentiable(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable JPEG at the same quality: ``kornia.enhance.jpeg_codec_differentiable``
        (Reich et al. 2024, "Differentiable JPEG: the devil is in the details"; IJG tables, 4:2:0,
        smooth rounding). RGB only. For gradient-based methods; slightly milder than the real codec."""
        from kornia.enhance import jpeg_codec_differentiable

        if x.shape[1] != 3:
            raise ValueError(f"{self.spec}: the differentiable codec needs RGB images, got {x.shape[1]} channels")
        quality = torch.full((x.shape[0],), float(self.quality), device=x.device, dtype=x.dtype)
        return from_unit(jpeg_codec_differentiable(to_unit(x).clamp(0, 1), quality))

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """Generalised inverse of docs/design.md#operators: the decoded image itself (``J(y) ~= y``)."""
        return y.clone()

    # -- the quantisation constraint set -------------------------------------------------------------
    def quantized_coefficients(self, y: torch.Tensor, *, decoded: bool = True, refine: int = 4) -> list[torch.Tensor]:
        """Coefficient indices ``q = round(DCT(plane - 128) / Q)`` per plane: ``[Y]`` or ``[Y, Cb, Cr]``,
        each ``(B, H/8, W/8, 8, 8)`` (chroma on the 2x2-subsampled grid).

        ``decoded=True``: ``y`` is a decoded JPEG (the measurement). Its chroma planes are mapped back
        to the subsampled grid by the pseudo-inverse of libjpeg's triangle upsampler, so ``q`` are
        the indices the file held up to the decoder's 8-bit rounding -- except where the decoder
        clipped to 0 or 255: there the unclipped decode of ``q`` is kept wherever it lies beyond the
        clip (which the clipped ``y`` allows) and ``q`` re-estimated, ``refine`` times (a
        consistent-decoding fixed point; it changes nothing when no pixel of ``y`` saturates).
        ``decoded=False``: ``y`` is a raw image; this is the float model of libjpeg's encoder
        (box-averaged chroma), e.g. for the codec-level consistency check of docs/design.md#metrics.
        """
        y = self._pad(y)
        q = self._estimate(self._planes(y), decoded)
        saturated = y.abs() >= 1
        for _ in range(refine if decoded and bool(saturated.any()) else 0):
            v = self.decode(q)
            v = torch.where(y >= 1, torch.maximum(v, y), torch.where(y <= -1, torch.minimum(v, y), y))
            q = self._estimate(self._planes(v), decoded)
        return q

    def _estimate(self, planes: list[torch.Tensor], decoded: bool) -> list[torch.Tensor]:
        dct, luma, chroma = _tables(self.quality, planes[0].dtype, planes[0].device)
        if len(planes) == 3:
            chroma_planes = torch.stack(planes[1:], 1)
            if decoded:
                uh = _unfancy(chroma_planes.shape[-2] // 2, chroma_planes.dtype, chroma_planes.device)
                uw = _unfancy(chroma_planes.shape[-1] // 2, chroma_planes.dtype, chroma_planes.device)
                planes[1:] = (uh @ chroma_planes @ uw.T).unbind(1)
            else:
                planes[1:] = F.avg_pool2d(chroma_planes, 2).unbind(1)
        return [torch.round(_block_dct(p - 128, dct) / t) for p, t in zip(planes, (luma, chroma, chroma))]

    def decode(self, q: list[torch.Tensor]) -> torch.Tensor:
        """Float model of libjpeg's decoder for indices ``q`` (as from :meth:`quantized_coefficients`):
        dequantise, inverse DCT, +128, triangle-upsample chroma, YCbCr -> RGB. Returns [-1, 1] images of
        the MCU-padded size, without the decoder's final clip and 8-bit rounding (``quantize`` of the
        cropped result reproduces Pillow's decode to about 51 dB PSNR)."""
        dct, luma, chroma = _tables(self.quality, q[0].dtype, q[0].device)
        planes = [_block_idct(c * t, dct) + 128 for c, t in zip(q, (luma, chroma, chroma))]
        if len(planes) == 3:
            chroma_planes = torch.stack(planes[1:], 1)
            uh = _fancy(chroma_planes.shape[-2], chroma_planes.dtype, chroma_planes.device)
            uw = _fancy(chroma_planes.shape[-1], chroma_planes.dtype, chroma_planes.device)
            planes[1:] = (uh @ chroma_planes @ uw.T).unbind(1)
        return self._image(planes)

    def project(self, x: torch.Tensor, y: torch.Tensor, *, iterations: int = 10, margin: float = 2.0) -> torch.Tensor:
        """Projection of ``x`` onto the JPEG quantisation constraint set of ``y`` (docs/design.md#jpeg-operator).

        In YCbCr every block-DCT coefficient (0..255 scale, orthonormal DCT) is clipped into the cell
        ``[(q - 1/2) Q, (q + 1/2) Q]`` of ``y``'s coefficient index ``q`` (:meth:`quantized_coefficients`),
        narrowed by ``min(margin, Q/2)`` at each end: libjpeg's integer colour conversion and chroma
        averaging plus the 8-bit rounding of the result move coefficients by up to about 2 units,
        which would push coefficients sitting exactly on a boundary into the next cell
        (``margin=0`` gives the exact cell; measured consistency is in tests/test_operators.py).
        Luma is a per-coefficient clip. Chroma cells constrain the 2x2 box average ``D`` of the
        full-resolution plane; since ``D D^T = I/4`` the closest full-resolution plane is
        ``c + 4 D^T (clip(D c) - D c)``, the coefficient correction nearest-upsampled -- exact and
        closed-form, so one pass is the exact projection in the YCbCr metric. ``iterations`` passes
        alternate it with the clamp to the valid range [-1, 1] (POCS, Youla and Webb 1982), which the
        codec applies too; the result is consistent after that clamp, and idempotent up to the POCS
        residual. Sizes that are not multiples of 16 are edge-padded as libjpeg pads them
        (approximate at the padded blocks).
        """
        h, w = x.shape[-2:]
        self._check_channels(x)
        dct, luma, chroma = _tables(self.quality, x.dtype, x.device)
        cells = []
        for q, t in zip(self.quantized_coefficients(y), (luma, chroma, chroma)):
            slack = (t / 2).clamp(max=margin)
            cells.append(((q - 0.5) * t + slack, (q + 0.5) * t - slack))
        z = self._pad(x)
        for _ in range(iterations):
            planes = self._planes(z.clamp(-1, 1))
            for i, (lo, hi) in enumerate(cells):
                full = planes[i]
                sub = full if i == 0 else F.avg_pool2d(full[:, None], 2)[:, 0]
                coef = _block_dct(sub - 128, dct)
                delta = _block_idct(torch.minimum(torch.maximum(coef, lo), hi) - coef, dct)
                planes[i] = full + (delta if i == 0 else delta.repeat_interleave(2, -2).repeat_interleave(2, -1))
            z = self._image(planes)
        return z[..., :h, :w]

    # -- colour planes on libjpeg's 0..255 scale --------------------------------------------------------
    def _check_channels(self, x: torch.Tensor) -> None:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"{self.spec}: JPEG needs 1 (grey) or 3 (RGB) channels, got {x.shape[1]}")

    @staticmethod
    def _pad(x: torch.Tensor) -> torch.Tensor:
        """Edge-replicate to whole MCUs (16 px for 4:2:0 colour, 8 px for grey), as libjpeg does."""
        mcu = 16 if x.shape[1] == 3 else 8
        pad_h, pad_w = -x.shape[-2] % mcu, -x.shape[-1] % mcu
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x

    @staticmethod
    def _planes(x: torch.Tensor) -> list[torch.Tensor]:
        v = (x + 1) * 127.5
        if x.shape[1] == 1:
            return [v[:, 0]]
        to_ycc, _, offset = _colour(x.dtype, x.device)
        return list((torch.einsum("ij,bjhw->bihw", to_ycc, v) + offset).unbind(1))

    @staticmethod
    def _image(planes: list[torch.Tensor]) -> torch.Tensor:
        if len(planes) == 1:
            return planes[0][:, None] / 127.5 - 1
        _, to_rgb, offset = _colour(planes[0].dtype, planes[0].device)
        rgb = torch.einsum("ij,bjhw->bihw", to_rgb, torch.stack(planes, 1) - offset)
        return rgb / 127.5 - 1
