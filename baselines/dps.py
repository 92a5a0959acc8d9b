"""DPS: Diffusion Posterior Sampling (Chung, Kim, McCann, Klasky, Ye; ICLR 2023), Algorithm 1.

Each step (docs/methods.md#dps): x0_hat = D(x_i; sigma_i); x'_{i-1} = the DDPM ancestral step from x_i towards
x0_hat; x_{i-1} = x'_{i-1} - zeta_i grad_{x_i} ||y - A(x0_hat(x_i))||, the gradient flowing back through the
denoiser and the operator (one forward and one backward pass per step). As in the official code
(``PosteriorSampling``: the gradient of the *unsquared* norm times ``scale``) the step is zeta' times the
gradient of ||y - A(x0_hat)||, i.e. the paper's zeta_i = zeta' / ||y - A(x0_hat)|| on the squared norm up to a
factor 2. Per image: the gradient of the sum of per-image norms.

Deviations from the original code:

* VE-sigma parametrisation (EDM denoiser) instead of VP. The guidance step is rescaled so that it is the
  paper's VP step: with x_VP = x_VE / sqrt(1 + sigma^2), grad_{x_VP} = sqrt(1 + sigma_i^2) grad_{x_VE} and the
  new VP state maps back to VE by sqrt(1 + sigma_{i-1}^2), so
  ``x_{i-1} = x'_{i-1} - zeta' sqrt((1 + sigma_i^2)(1 + sigma_{i-1}^2)) grad_{x_VE} ||y - A(x0_hat)||``.
* Noise levels: Karras levels, ``nfe`` steps (the paper: 1000 uniform DDPM steps, NFE = 1000 plus 1000 VJPs);
  the ancestral step uses DDPM's posterior variance beta-tilde (DDIM with eta = 1), not the learned-range
  variance of the ADM checkpoints; no ``clip_denoised``.
* Start A^+ y + sigma_max z instead of pure noise (`baselines.common`; negligible at sigma_max = 80, and it
  gives size-changing operators their image shape, cf. deepinv#941).
* JPEG (not in the paper): A = the differentiable codec ``op.differentiable`` (kornia; docs/methods.md#dps)
  inside the gradient, the real codec only produced y.
* Step size zeta' keeps the paper's per-step value (0.5 inpainting, 0.3 super-resolution and deblurring, the configs of
  docs/methods.md#dps; 1.0 for JPEG, which the paper does not cover) whatever the step count; with far fewer
  than 1000 steps the total guidance is correspondingly weaker -- that is the method's low-NFE behaviour.
"""

from __future__ import annotations

import math

import torch

from baselines.common import ddim_noise, denoise_with_vjp, initial_state, renoise, sampling_levels, step_callback
from operators.utils import Generator
from restore.engine.wrappers import class_conditioning
from restore.methods import Float, register_method

# zeta' per operator: DPS configs (inpainting, box or random, 0.5; super-resolution and Gaussian deblurring 0.3);
# JPEG is not in the paper.
DPS_SCALE = {"box": 0.5, "randbox": 0.5, "randmask": 0.5, "down": 0.3, "blur": 0.3, "jpeg": 1.0}


def dps_forward(op):
    """The differentiable forward map DPS pulls gradients through: ``op.differentiable`` where the operator has
    one (JPEG), otherwise ``op`` itself (linear operators are plain tensor algebra)."""
    return getattr(op, "differentiable", op)


def residual_norms(y: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
    """Per-image ||y - A(x)||_2, shape (B,)."""
    return (y - ax).flatten(1).norm(dim=1)


def dps_guidance(model, x: torch.Tensor, sigma: float, y: torch.Tensor, forward,
                 cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, grad)`` with x0_hat = D(x; sigma, **cond) and grad = grad_x ||y - forward(x0_hat)|| per image."""
    return denoise_with_vjp(model, x, sigma, lambda x0: residual_norms(y, forward(x0)).sum(), cond)


def dps_step(model, x: torch.Tensor, sigma: float, sigma_next: float, y: torch.Tensor, forward, zeta: float,
             generator: Generator = None, cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPS step from level sigma to sigma_next: ``(x_next, x0_hat)``. The DDPM ancestral step (DDIM, eta = 1)
    minus the guidance, rescaled from VP to VE: zeta sqrt((1 + sigma^2)(1 + sigma_next^2)) grad_{x_VE}.
    ``cond``: the network's conditioning (class labels)."""
    x0, grad = dps_guidance(model, x, sigma, y, forward, cond)
    x_prior = renoise(x0, (x - x0) / sigma, sigma_next, ddim_noise(sigma, sigma_next, 1.0), generator)
    return x_prior - zeta * math.sqrt((1 + sigma**2) * (1 + sigma_next**2)) * grad, x0


@register_method("dps", blind=False, model="edm", operators=tuple(DPS_SCALE), default_nfe=1000, needs_grad=True,
                 space={"scale": Float(0.01, 10.0, log=True)})
def restore_dps(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None, callback=None,
                class_labels=None, scale: float | None = None, sigma_start: float | None = None) -> torch.Tensor:
    """DPS (Chung et al. 2023, Algorithm 1): DDPM steps plus a gradient step on ||y - A(D(x))|| through the denoiser.

    ``scale``: zeta' (default `DPS_SCALE` for the operator); ``sigma_start``: first noise level (default
    sigma_max). NFE = ``nfe`` forward and ``nfe`` backward passes. Needs autograd (not in inference_mode).
    """
    cond = class_conditioning(model, class_labels, y.shape[0], y.device)
    zeta = DPS_SCALE[op.name] if scale is None else float(scale)
    forward = dps_forward(op)
    sigmas = sampling_levels(model, nfe, sigma_start)
    x = initial_state(op, y, sigmas[0], generator)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x_next, x0 = dps_step(model, x, sigma, sigma_next, y, forward, zeta, generator, cond)
        step_callback(callback, x, i, sigma, sigma_next, x0)
        x = x_next
    return x
