"""DDRM (Kawar, Elad, Ermon, Song; NeurIPS 2022) and DDRM-JPEG (Kawar, Song, Ermon, Elad; arXiv 2209.11888).

**DDRM** works in the spectral basis of a linear H = U S V^T: x_bar = V^T x, y_bar = S^+ U^T y, per-component
measurement noise sigma_y / s_i. One step from sigma_t to sigma_s with x_bar_theta = V^T D(x_t; sigma_t)
(DDRM §3, in the paper's VE-scaled variables x_t / sqrt(abar_t); docs/methods.md#ddrm):

1. s_i = 0 (null space): x_bar_theta + sqrt(1 - eta^2) sigma_s (x_bar_t - x_bar_theta) / sigma_t + eta sigma_s z;
2. sigma_s < sigma_y / s_i: x_bar_theta + sqrt(1 - eta^2) sigma_s (y_bar - x_bar_theta) / (sigma_y / s_i)
   + eta sigma_s z;
3. sigma_s >= sigma_y / s_i: (1 - eta_b) x_bar_theta + eta_b y_bar + sqrt(sigma_s^2 - eta_b^2 sigma_y^2 / s_i^2) z;

defaults eta = 0.85, eta_b = 1 (the paper's), 20 steps. Start: y_bar + sqrt(sigma_T^2 - sigma_y^2 / s_i^2) z on the
range, sigma_T z on the null space.

Operators whose nonzero singular values are all equal (H H^T = s^2 I on the range): every range component then
follows the same rule, so the update is written in pixels with the orthogonal projector P = H^+ H onto the row
space, V y_bar = H^+ y, and the split z = P z + (I - P) z of one white-noise draw -- no explicit V is needed.
This covers box / random-box / random-pixel inpainting (V = I, s = 1 on the observed pixels, the mask itself) and
block-average
downsampling by K (per axis the K-tap mean has H_n H_n^T = I / K, so s = 1/K for every low-resolution pixel,
with right singular vectors the normalised block indicators, V y_bar = nearest upsampling of y). The gain s^2 is
measured on a probe and the identity H H^T = s^2 I checked; antialiased bicubic downsampling has unequal
singular values and is **not supported** (it needs the separable SVD of the two axis matrices, which the
operator does not expose); so is Gaussian blur (``blur``: its singular values are the spectrum |H|, unequal).

**DDRM-JPEG** generalises the pseudo-inverse step to J = decode o encode (docs/methods.md#ddrm-jpeg): range
replacement x_tilde = x0_hat - J(x0_hat) + y, then
x_s = eta_B x_tilde + (1 - eta_B) x0_hat + sigma_s (eta_A z + (1 - eta_A) eps_hat)
(the VE form of the VP update in ``functions/denoising.py``), with eta_B = 0.4, eta_A = 1 and an SDEdit start
y + sigma_0 z at sigma_0 = 1.149, the VE level of t0 = 285 (the last point below ``init_timestep`` = 300 of the
20-step grid) on the linear-beta 1000-step schedule (abar_t0 = 0.431).

Deviations from the original code (both): VE-sigma parametrisation (the updates above are the VP updates divided
by sqrt(abar_s), exact); Karras levels between sigma_start and sigma_min instead of uniformly spaced integer
times, then a final step to sigma = 0 (DDRM-JPEG's last step also lands on abar = 1); DDRM uses the equal-gain
projector form above instead of a general SVD (same update); DDRM-JPEG uses the observed y where its code
re-compresses it, J(y) (JPEG is idempotent up to rounding), and no ``num_avg_samples`` averaging.
"""

from __future__ import annotations

import math

import torch

from baselines.common import initial_state, sampling_levels, step_callback
from operators.utils import Generator, randn
from restore.engine.sampling import ddim_step
from restore.engine.wrappers import class_conditioning
from restore.methods import Float, register_method

# VE level of DDRM-JPEG's start t0 = 285 on the linear-beta (1e-4 .. 0.02, 1000 steps) VP schedule.
DDRM_JPEG_SIGMA_START = 1.149


def spectral_gain(op, y: torch.Tensor, rtol: float = 1e-4) -> float:
    """The common singular value s of a linear operator with H H^T = s^2 I on its range (box: 1, average
    pooling by K: 1/K), measured on a fixed probe; ValueError when the singular values differ (bicubic)."""
    if not op.linear:
        raise ValueError(f"DDRM needs a linear operator, got {op.spec} (use ddrm_jpeg for JPEG)")
    shape = op.pinv(y).shape
    probe = op(torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(y.device))
    gram = op(op.adjoint(probe))
    s2 = float((gram * probe).sum() / probe.square().sum())
    if not torch.allclose(gram, s2 * probe, rtol=rtol, atol=rtol * probe.abs().max().item()):
        raise ValueError("DDRM here needs equal singular values (H H^T = s^2 I: box, randbox, randmask, "
                         f"down:kernel=avg); {op.spec} has unequal ones and no SVD")
    return math.sqrt(s2)


@register_method("ddrm", blind=False, model="edm", operators=("box", "randbox", "randmask", "down"), default_nfe=20,
                 space={"eta": Float(0.0, 1.0), "eta_b": Float(0.0, 1.0)})
def restore_ddrm(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None, callback=None,
                 class_labels=None, eta: float = 0.85, eta_b: float = 1.0,
                 sigma_start: float | None = None) -> torch.Tensor:
    """DDRM (Kawar et al. 2022): spectral DDIM with the measurement replacing the range components.

    For operators with equal singular values (box, randbox, randmask, down:kernel=avg); ``eta``, ``eta_b`` as in the
    paper (0.85, 1); measurement noise ``op.noise`` is handled as DDRM does. NFE = ``nfe``.
    """
    sigma_y = op.noise / spectral_gain(op, y)  # per-component noise sigma_y / s
    cond = class_conditioning(model, class_labels, y.shape[0], y.device)

    def project(v: torch.Tensor) -> torch.Tensor:  # P = H^+ H, the orthogonal projector onto the row space
        return op.pinv(op(v))

    y_bar = op.pinv(y)  # V y_bar
    sigmas = sampling_levels(model, nfe, sigma_start)
    z = randn(y_bar.shape, generator, device=y_bar.device, dtype=y_bar.dtype)
    x = sigmas[0] * z + project(y_bar + (math.sqrt(max(0.0, sigmas[0] ** 2 - sigma_y**2)) - sigmas[0]) * z)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = model(x, sigma, **cond)
        step_callback(callback, x, i, sigma, sigma_next, x0)
        z = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        null = ddim_step(x0, math.sqrt(1 - eta**2) * (x - x0) / sigma + eta * z, 0.0, sigma_next)
        if sigma_next >= sigma_y:
            rng = (1 - eta_b) * x0 + eta_b * y_bar + math.sqrt(sigma_next**2 - eta_b**2 * sigma_y**2) * z
        else:
            rng = ddim_step(x0, math.sqrt(1 - eta**2) * (y_bar - x0) / sigma_y + eta * z, 0.0, sigma_next)
        x = null + project(rng - null)
    return x


@register_method("ddrm-jpeg", blind=False, model="edm", operators=("jpeg",), default_nfe=20,
                 space={"eta_b": Float(0.0, 1.0), "eta_a": Float(0.0, 1.0)})
def restore_ddrm_jpeg(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None, callback=None,
                      class_labels=None, eta_b: float = 0.4, eta_a: float = 1.0,
                      sigma_start: float = DDRM_JPEG_SIGMA_START) -> torch.Tensor:
    """DDRM-JPEG (Kawar et al. 2022b): range replacement x0 - J(x0) + y mixed into a DDIM step, SDEdit start.

    ``eta_b``, ``eta_a``: eta_B, eta_A of the paper (0.4, 1); ``sigma_start``: start level (t0 = 285). NFE = ``nfe``
    (each step also runs the real codec once).
    """
    cond = class_conditioning(model, class_labels, y.shape[0], y.device)
    sigmas = sampling_levels(model, nfe, sigma_start)
    x = initial_state(op, y, sigmas[0], generator)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = model(x, sigma, **cond)
        step_callback(callback, x, i, sigma, sigma_next, x0)
        x_tilde = x0 - op(x0) + y  # range replacement
        eps = (1 - eta_a) * (x - x0) / sigma + eta_a * randn(x.shape, generator, device=x.device, dtype=x.dtype)
        x = ddim_step(eta_b * x_tilde + (1 - eta_b) * x0, eps, 0.0, sigma_next)
    return x
