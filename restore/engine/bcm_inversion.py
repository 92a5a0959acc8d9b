"""BCM inversion, reconstruction and real-to-real interpolation (Li & He 2024; docs/methods.md#bcm-inversion).

A BCM inverts an image with 1-2 jumps *up* the PF ODE. Jumps starting at t ~ sigma_min are poorly
learned, so the paper adds a small noise (0.07 z) and treats the result as the trajectory point at
t = 0.07 before jumping to sigma_max (the "small-noise trick").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from operators.utils import Generator, quantize, randn, to_unit
from restore.engine.sampling import Callback, sample_plan
from restore.engine.schedules import Jump, ancestral_plan, bcm_paper_plan


def _ascending(sigmas) -> list[float]:
    s = [float(v) for v in sigmas]
    if len(s) < 2 or s[0] <= 0 or any(b <= a for a, b in zip(s[:-1], s[1:])):
        raise ValueError(f"inversion levels must be > 0 and strictly ascending, got {s}")
    return s


def bcm_invert(model, x: torch.Tensor, sigmas: Sequence[float] = (0.07, 80.0), noise: float = 0.07, *,
               generator: Generator = None, callback: Callback = None,
               extra_args: dict | None = None) -> torch.Tensor:
    """BCM inversion (docs/methods.md#bcm-inversion): x~ = x + noise z is taken as the PF-ODE point at t = sigmas[0],
    then jumped up through ``sigmas`` (paper: (0.07, 80) for 1 NFE, (0.07, 15, 80) for 2 NFE).
    ``noise = 0`` skips the noise (the input is then treated as exactly on the trajectory at sigmas[0]).
    Returns the latent at ``sigmas[-1]``; NFE = len(sigmas) - 1."""
    s = _ascending(sigmas)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if noise > 0:
        x = x + noise * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return sample_plan(model, x, ancestral_plan(s), callback=callback, extra_args=extra_args)


def bcm_reconstruct(model, x: torch.Tensor, sigmas: Sequence[float] = (0.07, 80.0), noise: float = 0.07,
                    sigma_out: float | None = None, *, generator: Generator = None, callback: Callback = None,
                    extra_args: dict | None = None) -> torch.Tensor:
    """Invert with `bcm_invert`, then generate back in one step f(x_T, sigmas[-1], sigma_out)
    (docs/methods.md#bcm-inversion; ``sigma_out`` defaults to ``model.sigma_min`` as in the paper).
    NFE = len(sigmas)."""
    latent = bcm_invert(model, x, sigmas, noise, generator=generator, callback=callback, extra_args=extra_args)
    u = model.sigma_min if sigma_out is None else float(sigma_out)
    return sample_plan(model, latent, (Jump(float(sigmas[-1]), u),), extra_args=extra_args)


def inversion_mse(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Per-image reconstruction MSE of docs/methods.md#bcm-inversion: both images 8-bit quantised, scaled to [0, 1],
    squared error averaged over channels and pixels. Returns shape (B,)."""
    diff = to_unit(quantize(x)) - to_unit(quantize(x_rec))
    return diff.square().flatten(1).mean(1)


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-image spherical interpolation of latents (Shoemake 1985; as in DDIM / CM interpolation).

    Directions are interpolated on the sphere and the norm linearly, so interpolants stay at the noise
    level of the end points and ``alpha`` = 0 / 1 return ``a`` / ``b``.
    """
    fa, fb = a.flatten(1), b.flatten(1)
    na, nb = fa.norm(dim=1, keepdim=True), fb.norm(dim=1, keepdim=True)
    ua, ub = fa / na, fb / nb
    theta = torch.arccos((ua * ub).sum(1, keepdim=True).clamp(-1, 1))
    sin = torch.sin(theta)
    parallel = sin < 1e-6  # (anti)parallel directions: fall back to linear interpolation of the directions
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, 1 - alpha, torch.sin((1 - alpha) * theta) / safe)
    wb = torch.where(parallel, torch.full_like(sin, alpha), torch.sin(alpha * theta) / safe)
    direction = wa * ua + wb * ub
    direction = direction / direction.norm(dim=1, keepdim=True)
    return (direction * ((1 - alpha) * na + alpha * nb)).view_as(a)


def interpolate(model, x_a: torch.Tensor, x_b: torch.Tensor, alphas: Sequence[float], *,
                sigmas: Sequence[float] = (0.07, 80.0), noise: float = 0.07, nfe: int = 1,
                generator: Generator = None, extra_args: dict | None = None) -> torch.Tensor:
    """Real-to-real interpolation with a BCM (docs/methods.md#real-to-real-interpolation, recipe UNVERIFIED there):
    invert both images (`bcm_invert`), `slerp` the latents, regenerate each interpolant with the paper's ``nfe``-step
    chain (1: one-step, 2: 80 -> 2.4 -> sigma_min; deterministic). Returns shape (B, len(alphas), C, H, W).
    Cost: 2 (len(sigmas) - 1) + nfe * len(alphas) NFE."""
    if nfe not in (1, 2):
        raise ValueError(f"interpolation regenerates deterministically with 1 or 2 NFE, got {nfe}")
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    z_a = bcm_invert(model, x_a, sigmas, noise, generator=generator, extra_args=extra_args)
    z_b = bcm_invert(model, x_b, sigmas, noise, generator=generator, extra_args=extra_args)
    plan = bcm_paper_plan(nfe, sigma_max=float(sigmas[-1]), sigma_min=model.sigma_min)
    out = [sample_plan(model, slerp(z_a, z_b, float(alpha)), plan, extra_args=extra_args) for alpha in alphas]
    return torch.stack(out, dim=1)
