"""Downsampling by an integer factor K as a separable linear operator ``y = A_H x A_W^T`` (per channel).

``A_n`` (``n/K x n``) is one matrix per axis and size, built once and cached, so the adjoint is the
exact transpose and the pseudo-inverse is the Kronecker product of the per-axis Moore-Penrose
inverses (``(A_H (x) A_W)^+ = A_H^+ (x) A_W^+``), hence ``A A^+ = I`` to rounding error.

* ``avg``: K x K block average (SR "pool" task of DDRM / I2SB). Then ``A^T = nearest upsampling / K^2``
  and ``A^+ = nearest upsampling``.
* ``bicubic``: antialiased bicubic as MATLAB ``imresize`` (and I2SB's ``sr4x-bicubic``): Keys'
  cubic convolution kernel with a = -0.5 (Keys 1981, Eq. 15) stretched by K, i.e. 4K taps
  ``w_j = k((j - c_i)/K) / K`` around the output centre ``c_i = K i + (K - 1)/2``, rows normalised
  to sum 1; taps outside the image are mirrored with the edge sample repeated (``-1 -> 0``,
  MATLAB's ``symmetric``), which keeps every row a proper average.
"""

from __future__ import annotations

import numpy as np
import torch

from operators.base import Operator, Param
from operators.registry import register_operator
from operators.utils import tensor_cache


def _keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (support [-2, 2])."""
    t = np.abs(t)
    return np.where(
        t <= 1,
        (a + 2) * t**3 - (a + 3) * t**2 + 1,
        np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0),
    )


@tensor_cache(64)
def _axis_matrices(n: int, factor: int, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(A, A^+)`` for one axis of length ``n``: A is ``(n / factor, n)``."""
    m = n // factor
    rows = np.arange(m)
    if kernel == "avg":
        taps = rows[:, None] * factor + np.arange(factor)
        weights = np.full(taps.shape, 1.0 / factor)
    else:
        centre = factor * rows + (factor - 1) / 2
        taps = np.floor(centre[:, None] - 2 * factor) + np.arange(4 * factor + 2)
        weights = _keys_cubic((taps - centre[:, None]) / factor)
        weights /= weights.sum(axis=1, keepdims=True)
        taps = taps.astype(np.int64) % (2 * n)  # symmetric extension has period 2n
        taps = np.where(taps >= n, 2 * n - 1 - taps, taps)
    a = np.zeros((m, n))
    np.add.at(a, (np.broadcast_to(rows[:, None], taps.shape), taps), weights)
    a = torch.from_numpy(a)
    return a, torch.linalg.pinv(a)


@tensor_cache(64)
def _matrices(n: int, factor: int, kernel: str, dtype: torch.dtype, device: torch.device):
    a, a_pinv = _axis_matrices(n, factor, kernel)
    return a.to(device, dtype), a_pinv.to(device, dtype)


@register_operator("down")
class Downsample(Operator):
    """Downsampling by an integer factor: block average (avg) or antialiased bicubic (MATLAB imresize)."""

    linear = True
    PARAMS = (
        Param("factor", int, help="downsampling factor K; H and W must be multiples of K", low=2),
        Param("kernel", str, help="avg = K x K block mean; bicubic = antialiased Keys a=-0.5",
              choices=("avg", "bicubic")),
    )

    def output_shape(self, input_shape):
        *lead, h, w = input_shape
        k = self.params["factor"]
        if h % k or w % k:
            raise ValueError(f"{self.spec}: image size {h}x{w} is not a multiple of the factor {k}")
        return (*lead, h // k, w // k)

    def _axes(self, h: int, w: int, like: torch.Tensor):
        """``(A_H, A_H^+), (A_W, A_W^+)`` for a high-resolution ``h x w`` image, on ``like``'s device/dtype."""
        self.output_shape((h, w))
        args = (self.params["factor"], self.params["kernel"], like.dtype, like.device)
        return _matrices(h, *args), _matrices(w, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ah, _), (aw, _) = self._axes(*x.shape[-2:], x)
        return ah @ x @ aw.T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        k = self.params["factor"]
        (ah, _), (aw, _) = self._axes(y.shape[-2] * k, y.shape[-1] * k, y)
        return ah.T @ y @ aw

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        k = self.params["factor"]
        (_, ph), (_, pw) = self._axes(y.shape[-2] * k, y.shape[-1] * k, y)
        return ph @ y @ pw.T
