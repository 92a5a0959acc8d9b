"""The sampler pieces the zero-shot diffusion baselines (DPS, PiGDM, DDRM, DDRM-JPEG, DDNM) share.

All of them are DDIM/DDPM-type samplers written for a VP network (x_t = sqrt(abar_t) x_0 + sqrt(1-abar_t) eps).
Here they run on the EDM denoiser ``D(x; sigma)`` in the variance-exploding parametrisation x = x_0 + sigma eps
(docs/design.md#conventions). The two are the same process up to the scaling x_VE = x_VP / sqrt(abar) with
sigma = sqrt((1 - abar) / abar) (docs/methods.md#zero-shot-diffusion-baselines), so every update below is the VP update
divided by sqrt(abar_next):

* Tweedie's estimate x0_hat is the denoiser output; eps_hat = (x_t - x0_hat) / sigma_t;
* the generic DDIM step x_s = x0 + c_eps * eps_hat + c_z * z with c_eps^2 + c_z^2 = sigma_s^2 (`renoise`; its
  deterministic part is the engine's one DDIM / Euler step, `restore.engine.sampling.ddim_step`);
  the DDIM-eta noise (Song et al. 2021, Eq. 16) becomes c_z = eta sigma_s sqrt(1 - sigma_s^2 / sigma_t^2)
  (`ddim_noise`: eta = 1 is DDPM's ancestral step with the posterior variance beta-tilde, eta = 0 the
  deterministic DDIM / Euler step), and the "eta" of DDRM / DDNM is c_z = eta sigma_s (`mix_noise`).

Noise levels are the Karras rho = 7 levels (`sampling_levels`) with a final step to sigma = 0, so one step is
one network evaluation and any step count is allowed (the originals use uniformly spaced integer VP times
out of 1000; that is the one schedule deviation all baselines share). All samplers start from
A^+ y + sigma_start z (`initial_state`): the SDEdit-style start of DDRM-JPEG and PiGDM (RED-diff code) and
exactly DDRM's start for noiseless measurements; for DPS and DDNM (pure noise in the papers) the offset A^+ y
is below 1/80 of the noise standard deviation at the default sigma_start = sigma_max = 80.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from operators.utils import Generator, randn
from restore.engine.sampling import ddim_step
from restore.engine.schedules import karras_sigmas


def sampling_levels(model, nfe: int, sigma_start: float | None = None) -> list[float]:
    """``nfe`` Karras levels from ``sigma_start`` (default ``model.sigma_max``) down to ``model.sigma_min``,
    then 0: one network evaluation per step."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    start = model.sigma_max if sigma_start is None else float(sigma_start)
    if not model.sigma_min <= start:
        raise ValueError(f"sigma_start must be >= sigma_min = {model.sigma_min}, got {start}")
    return karras_sigmas(nfe, model.sigma_min, start).tolist()


def initial_state(op, y: torch.Tensor, sigma: float, generator: Generator = None) -> torch.Tensor:
    """A^+ y + sigma z: the measurement's generalised inverse (image-shaped) at noise level ``sigma``."""
    base = op.pinv(y)
    return base + sigma * randn(base.shape, generator, device=base.device, dtype=base.dtype)


def ddim_noise(sigma: float, sigma_next: float, eta: float) -> float:
    """Fresh-noise std of the DDIM-eta step from sigma to sigma_next (VE form of Song et al. 2021, Eq. 16)."""
    if sigma_next == 0:
        return 0.0
    return min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1 - sigma_next**2 / sigma**2)))


def mix_noise(sigma_next: float, eta: float) -> float:
    """Fresh-noise std of DDRM's / DDNM's eta step: eta sigma_next (the rest is the model's eps_hat)."""
    return eta * sigma_next


def renoise(x0: torch.Tensor, eps: torch.Tensor, sigma_next: float, noise_std: float,
            generator: Generator = None) -> torch.Tensor:
    """x0 + sqrt(sigma_next^2 - noise_std^2) eps + noise_std z: back to level sigma_next with total std sigma_next.
    The deterministic part is `restore.engine.sampling.ddim_step` from x0 (level 0) to c_eps along eps."""
    x = ddim_step(x0, eps, 0.0, math.sqrt(max(0.0, sigma_next**2 - noise_std**2)))
    if noise_std > 0:
        x = x + noise_std * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x


def denoise_with_vjp(model, x: torch.Tensor, sigma: float, loss: Callable[[torch.Tensor], torch.Tensor],
                     cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, grad)``: x0_hat = D(x; sigma, **cond) and grad = d loss(x0_hat) / dx through the denoiser
    (one forward and one backward pass; both detached). ``loss`` returns a scalar that sums per-image terms,
    so each image gets the gradient of its own term; ``cond``: the network's conditioning (class labels,
    `restore.engine.wrappers.class_conditioning`). Needs autograd: not under ``torch.inference_mode``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        x0 = model(x, sigma, **(cond or {}))
        (grad,) = torch.autograd.grad(loss(x0), x)
    return x0.detach(), grad


def step_callback(callback, x, i, sigma, sigma_next, denoised) -> None:
    """Report one sampler step with the keys of `restore.engine.sampling` (x, i, sigma, sigma_next, denoised)."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
