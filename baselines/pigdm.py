"""PiGDM: pseudoinverse-guided diffusion models (Song, Vahdat, Mardani, Kautz; ICLR 2023).

Noiseless guidance (docs/methods.md#pigdm): g = ((H^+ y - H^+ H x0_hat)^T d x0_hat / d x_t)^T, one vector-Jacobian
product through the denoiser and none through H (H may be non-linear and non-differentiable), added to a DDIM
step. Following RED-diff's ``algos/pgdm.py`` (no official code exists) with its defaults ``awd=True``
(adaptive weight: the VP update is x_s = sqrt(abar_s) x0_hat + c2 eps_hat + c1 z + w sqrt(abar_s) sqrt(abar_t) g_VP),
``grad_term_weight`` w = 1 and DDIM eta = 0. Since sqrt(abar_t) g_VP = g_VE (the VJP w.r.t. the VE state), that
update is, in the VE parametrisation, the DDIM step from the corrected estimate

    x0_tilde = x0_hat + w g,   g = (d D(x_t; sigma_t) / d x_t)^T (H^+ y - H^+ H x0_hat),
    x_s = x0_tilde + c_eps eps_hat + c_z z,   eps_hat = (x_t - x0_hat) / sigma_t,

so the rescaling to VE is exact and parameter-free. Operators: linear H with H^+ = ``op.pinv``; JPEG with
H = decode o encode (the real codec, ``op``) and H^+ = identity (``op.pinv``), as RED-diff does: the guidance
residual is y - J(x0_hat) in pixels.

Deviations from RED-diff: VE-sigma parametrisation (exact, see above); Karras levels and ``nfe`` steps instead of
100 uniform DDIM steps; the start is A^+ y + sigma_start z with sigma_start = sigma_max by default (RED-diff starts
from H^+ y noised to its first time step, the paper uses t = 500, sigma ~ 3.44, for super-resolution: pass
``sigma_start``); measurement noise is ignored (the noisy-linear guidance needs (r_t^2 H H^T + sigma_y^2 I)^-1,
not implemented).
"""

from __future__ import annotations

import torch

from baselines.common import ddim_noise, denoise_with_vjp, initial_state, renoise, sampling_levels, step_callback
from operators.utils import Generator
from restore.engine.wrappers import class_conditioning
from restore.methods import Float, register_method


def pigdm_guidance(model, x: torch.Tensor, sigma: float, y: torch.Tensor, op,
                   cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, g)``: x0_hat = D(x; sigma, **cond) and g = J^T (H^+ y - H^+ H x0_hat), J = dD/dx (one VJP)."""

    def loss(x0: torch.Tensor) -> torch.Tensor:
        target = op.pinv(y) - op.pinv(op(x0.detach()))  # H is not differentiated (RED-diff: mat.detach())
        return (target * x0).sum()

    return denoise_with_vjp(model, x, sigma, loss, cond)


PIGDM_OPERATORS = ("jpeg", "box", "randbox", "randmask", "down", "blur")


@register_method("pigdm", blind=False, model="edm", operators=PIGDM_OPERATORS, default_nfe=100, needs_grad=True,
                 space={"weight": Float(0.1, 3.0, log=True), "eta": Float(0.0, 1.0)})
def restore_pigdm(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None, callback=None,
                  class_labels=None, weight: float = 1.0, eta: float = 0.0,
                  sigma_start: float | None = None) -> torch.Tensor:
    """PiGDM (Song et al. 2023): DDIM steps from x0_hat + w J^T (H^+ y - H^+ H x0_hat); JPEG via H^+ = identity.

    ``weight``: w (RED-diff ``grad_term_weight``); ``eta``: DDIM eta; ``sigma_start``: first noise level
    (default sigma_max). NFE = ``nfe`` forward and ``nfe`` backward passes. Needs autograd.
    """
    cond = class_conditioning(model, class_labels, y.shape[0], y.device)
    sigmas = sampling_levels(model, nfe, sigma_start)
    x = initial_state(op, y, sigmas[0], generator)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0, g = pigdm_guidance(model, x, sigma, y, op, cond)
        step_callback(callback, x, i, sigma, sigma_next, x0)
        x = renoise(x0 + weight * g, (x - x0) / sigma, sigma_next, ddim_noise(sigma, sigma_next, eta), generator)
    return x
