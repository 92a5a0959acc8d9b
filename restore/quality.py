"""Per-image restoration metrics on 8-bit-quantised images: PSNR, SSIM and consistency-PSNR.

Every metric takes float32 ``(B, C, H, W)`` images in [-1, 1], quantises them to 8 bit
(:func:`operators.utils.to_uint8`, i.e. exactly what a saved PNG holds, so CLI outputs and benchmark
numbers agree), works in [0, 1] units (MAX = 1) in float64, and returns one value per image, shape
``(B,)``; callers aggregate (mean, std, median).

PSNR is unbounded for identical images: every PSNR here is capped at :data:`PSNR_CAP` = 100 dB
(``cap=None`` returns ``inf`` instead). With 8-bit images a finite PSNR is at most
``20 log10(255) + 10 log10(C H W)`` (83 dB at 3x32x32, 101 dB at 3x256x256), so the cap only merges
"exact" with "one code value off in one pixel of a large image"; report the fraction of capped
values when it matters.

They live in ``restore`` because `restore run` writes them into its manifest; the benchmark's metric
table (:mod:`benchmarks.metrics`) adds the set-level FID and KID.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from operators.utils import quantize, to_uint8, to_unit

PSNR_CAP = 100.0


def _unit8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> their 8-bit values in [0, 1], float64."""
    return to_uint8(x).double() / 255


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError("expected two (B, C, H, W) tensors of the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def _psnr_from_mse(mse: torch.Tensor, cap: float | None) -> torch.Tensor:
    psnr = -10 * torch.log10(mse)  # MAX = 1; mse == 0 gives +inf
    return psnr if cap is None else psnr.clamp(max=cap)


def psnr(x_hat: torch.Tensor, x: torch.Tensor, *, cap: float | None = PSNR_CAP) -> torch.Tensor:
    """Per-image PSNR (dB) of the 8-bit-quantised images: ``10 log10(1 / MSE)``, MSE over C, H, W in [0, 1].

    Identical images give ``cap`` (default 100 dB; ``None`` -> ``inf``). Returns float64 ``(B,)``.
    """
    _check_pair(x_hat, x)
    mse = (_unit8(x_hat) - _unit8(x.to(x_hat.device))).square().mean(dim=(1, 2, 3))
    return _psnr_from_mse(mse, cap)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    *,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image SSIM of the 8-bit-quantised images (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004, Eqs. 13 and 17).

    SSIM map ``((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    local statistics from an ``window`` x ``window`` Gaussian (std ``sigma``), valid positions only (no
    padding), ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, L = 1; averaged over positions, then over channels.
    No downsampling of large images (piq's ``downsample=True`` and the MATLAB script differ here).
    Returns float64 ``(B,)``; images smaller than the window raise ``ValueError``.
    """
    _check_pair(x_hat, x)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {tuple(x.shape[-2:])}")
    a, b = _unit8(x_hat), _unit8(x.to(x_hat.device))
    c = a.shape[1]
    g = _gaussian_window(window, sigma, a.dtype, a.device)
    gh, gv = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, per channel
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = k1**2, k2**2
    ssim_map = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)


def consistency_psnr(x_hat: torch.Tensor, y: torch.Tensor, op, *, cap: float | None = PSNR_CAP) -> torch.Tensor:
    """Per-image consistency PSNR (dB): how well the 8-bit restoration reproduces the observed measurement.

    cons-PSNR(x_hat; y, A) = 10 log10(1 / MSE_obs), MSE_obs = (1 / |Omega|) sum_{k in Omega} (A(q(x_hat))_k - y_k)^2
    (definition of docs/design.md#metrics; cf. SR3's LR-consistency), where

    * ``q`` quantises ``x_hat`` to 8 bit (what is saved; it also clamps to the valid range, as the
      measurement pipeline does) and ``A = op`` is the same operator that produced ``y``;
    * both sides are compared in [0, 1] units (MAX = 1) in float64; ``y`` is used exactly as given:
      pass the measurement the restorer saw (if it was stored as 8-bit PNG, the stored values);
    * Omega = the observed measurement entries: if ``op`` has ``mask_for`` (``op.mask_for(y)``: a
      boolean mask, True = observed, broadcastable to ``y``, e.g. ``(B, 1, H, W)`` for box
      inpainting) only those entries count, so the hole and its fill value stay out of the metric;
      otherwise all entries of ``y`` — for downsampling ``y`` is the low-resolution image (LR space),
      for JPEG ``op`` is the real codec (decoded image space).

    Ground truth without measurement noise scores ``cap`` (100 dB by default; ``cap=None`` -> inf).
    An image with no observed entry scores NaN. Returns float64 ``(B,)``.
    """
    ay = op(quantize(x_hat))
    if ay.shape != y.shape:
        raise ValueError(f"op(x_hat) has shape {tuple(ay.shape)} but y has {tuple(y.shape)}")
    err = (to_unit(ay.double()) - to_unit(y.to(ay.device).double())).square()
    if not hasattr(op, "mask_for"):
        mse = err.flatten(1).mean(dim=1)
    else:
        mask = op.mask_for(y)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"op.mask_for must return a bool tensor (True = observed), got {type(mask).__name__}")
        m = torch.broadcast_to(mask.to(err.device), err.shape).double()
        mse = (err * m).flatten(1).sum(dim=1) / m.flatten(1).sum(dim=1)  # 0/0 -> NaN: nothing observed
    return _psnr_from_mse(mse, cap)
