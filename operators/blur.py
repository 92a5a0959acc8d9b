"""Gaussian deblurring: circular convolution with a normalised K x K Gaussian kernel, applied in the Fourier basis.

The task of DPS (Chung et al., ICLR 2023, Sec. 4, experimental setup: 61 x 61 kernel, std 3.0, on 256 px
images; ``blur:sigma=3.0,size=61``) and DDRM (Kawar et al., NeurIPS 2022, Gaussian deblurring).

* Kernel: ``k(i, j) = g(i) g(j)``, ``g(o) ∝ exp(-o^2 / 2 sigma^2)`` on the ``size`` (odd) integer offsets
  ``|o| <= size // 2``, normalised to sum 1 (:func:`gaussian_kernel`).
* Boundary: **circular** (periodic). ``A`` is then a circulant, diagonal in the 2-D DFT basis with the real,
  separable spectrum ``H(f, g) = h_H(f) h_W(g)`` (the kernel is symmetric; a kernel wider than the image wraps
  around), so ``A`` is symmetric: ``adjoint = forward`` exactly. Deviation: DPS pads by reflection
  (``nn.ReflectionPad2d``) and builds its kernel with ``scipy.ndimage.gaussian_filter`` (truncated at 4 sigma);
  DDRM pads with zeros. Away from the border (``size // 2`` pixels) all three agree up to the kernel tails.
* Spectral floor ``eps`` (default 1e-3): frequencies with ``|H| <= eps`` are dropped from ``A`` itself, i.e.
  ``A = F^-1 diag(H 1[|H| > eps]) F``. ``A`` then has an exact, numerically stable Moore-Penrose inverse
  ``A^+ = F^-1 diag(1[|H| > eps] / H) F`` (``A A^+ A = A``, ``A^+ A A^+ = A^+``, ``project`` exact); it differs
  from the plain blur by at most ``eps ||x||`` (below the 8-bit step of a measurement for the default). DDRM
  does the same to its SVD (singular values below 3e-2 per axis set to 0). Since ``|H| <= 1``, ``A^+``
  amplifies by at most ``1 / eps``: with measurement noise the pseudo-inverse is noisy, as it must be.

The measurement noise is white (as in DPS), so a noisy ``y`` has a part outside the range of ``A``, which every
use of ``A^T`` / ``A^+`` ignores and ``project`` leaves unmatched (it matches ``A A^+ y``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from operators.base import Operator, Param
from operators.registry import register_operator
from operators.utils import tensor_cache


def _taps(sigma: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets ``-size//2 .. size//2`` and the normalised 1-D Gaussian on them (float64)."""
    offsets = np.arange(size) - size // 2
    g = np.exp(-0.5 * (offsets / sigma) ** 2)
    return offsets, g / g.sum()


def gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    """The ``size x size`` blur kernel (float64, sums to 1)."""
    g = torch.from_numpy(_taps(sigma, size)[1])
    return g[:, None] * g[None, :]


@functools.lru_cache(maxsize=64)
def _axis_spectrum(n: int, sigma: float, size: int) -> np.ndarray:
    """DFT of the 1-D kernel wrapped onto a circle of ``n`` samples: real, as the kernel is symmetric."""
    offsets, g = _taps(sigma, size)
    return np.cos(2 * np.pi * np.outer(np.arange(n), offsets) / n) @ g


@tensor_cache(64)
def _spectra(h: int, w: int, sigma: float, size: int, eps: float, dtype: torch.dtype, device: torch.device):
    """``(H_eps, H_eps^+)`` on the ``rfft2`` grid ``(h, w // 2 + 1)``: kept spectrum and its inverse (0 elsewhere)."""
    full = np.outer(_axis_spectrum(h, sigma, size), _axis_spectrum(w, sigma, size)[: w // 2 + 1])
    keep = np.abs(full) > eps
    inv = np.divide(1.0, full, out=np.zeros_like(full), where=keep)
    return tuple(torch.from_numpy(s).to(device, dtype) for s in (np.where(keep, full, 0.0), inv))


@register_operator("blur")
class GaussianBlur(Operator):
    """Gaussian blur: circular convolution with a normalised size x size Gaussian kernel (DPS deblurring task)."""

    linear = True
    PARAMS = (
        Param("sigma", float, help="std of the Gaussian in pixels", low=0.1),
        Param("size", int, help="kernel side K (odd); DPS: 61", low=1),
        Param("eps", float, 1e-3, "spectral floor: frequencies with gain <= eps are outside the range of A",
              low=1e-9, high=0.5),
    )

    def __init__(self, **params) -> None:
        super().__init__(**params)
        if self.params["size"] % 2 == 0:
            raise ValueError(f"operator 'blur': bad value {self.params['size']} for parameter size: "
                             "the kernel side must be odd")

    def _filter(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """``F^-1 diag(s) F x`` with ``s`` the kept spectrum (or its inverse), per image and channel."""
        h, w = x.shape[-2:]
        p = self.params
        spectrum = _spectra(h, w, p["sigma"], p["size"], p["eps"], x.dtype, x.device)[int(inverse)]
        return torch.fft.irfft2(torch.fft.rfft2(x) * spectrum, s=(h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._filter(x, inverse=False)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._filter(y, inverse=False)  # real symmetric spectrum: A^T = A

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self._filter(y, inverse=True)
