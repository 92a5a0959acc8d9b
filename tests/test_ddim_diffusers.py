"""DDIM inversion and sampling (restore.engine.exact_inversion) against diffusers itself.

Oracle: data N(MU, S^2) per pixel, whose exact eps-prediction is closed-form in diffusers' VP scaling,
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z:
E[z | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) MU) / (abar_t S^2 + 1 - abar_t),
and whose EDM denoiser is `restore.engine.oracles.GaussianFlow` (the same model in x_sigma = x_t / sqrt(abar_t),
sigma_t = sqrt((1 - abar_t) / abar_t)). diffusers' schedulers run on that eps-model in float64 (their alphas_cumprod
cast to float64 after construction) with ``clip_sample=False`` (the default True clamps x0_hat to [-1, 1]).

Matching the grids: diffusers' inverse step with timestep t goes from the previous timestep t - T//N (or from
``initial_alpha_cumprod`` for the first: 1 with ``set_alpha_to_one``, else abar[0]) to t, so our ascending levels
are sigma(initial), sigma(abar[t_0]), sigma(abar[t_1]), ... . That is a chain only when T//N is the timestep
spacing: N divides T here (with "trailing" spacing and N not dividing T, diffusers' step starts from a level
the previous step did not end at). With ``set_alpha_to_one=False``, "leading" spacing and ``steps_offset=0`` the
first step goes from abar[0] to abar[0] (t_0 = 0), an identity that costs one NFE; our grid skips it.
"""

from __future__ import annotations

import math

import diffusers
import pytest
import torch

from restore.engine.exact_inversion import ddim_invert, ddim_sample
from restore.engine.oracles import GaussianFlow
from restore.engine.schedules import karras_sigmas

MU, S = 0.3, 0.5
FLOW = GaussianFlow(MU, S)
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # Stable Diffusion's schedule
LINEAR = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}  # DDPM's (diffusers' default)
CONFIGS = {
    "diffusers-default": {**LINEAR, "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "leading"},
    "null-text (SD)": {**SD, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"},
    "SD-trailing": {**SD, "set_alpha_to_one": False, "timestep_spacing": "trailing"},
    "no-offset": {**LINEAR, "set_alpha_to_one": False, "steps_offset": 0, "timestep_spacing": "leading"},
}


def eps_vp(x_vp: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Exact eps-prediction E[z | x_t] of N(MU, S^2) data at VP level abar."""
    return (1 - abar).sqrt() * (x_vp - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)


def _schedulers(config: dict, n: int):
    inverse = diffusers.DDIMInverseScheduler(clip_sample=False, **config)
    forward = diffusers.DDIMScheduler(clip_sample=False, **config)
    for sched in (inverse, forward):
        sched.set_timesteps(n)
        sched.alphas_cumprod = sched.alphas_cumprod.double()
    inverse.initial_alpha_cumprod = inverse.initial_alpha_cumprod.double()
    forward.final_alpha_cumprod = forward.final_alpha_cumprod.double()
    return inverse, forward


def _levels(inverse) -> tuple[torch.Tensor, torch.Tensor]:
    """(abar, sigma) of the chain the inverse scheduler walks, ascending noise, repeated levels dropped."""
    abar = [inverse.initial_alpha_cumprod] + [inverse.alphas_cumprod[t] for t in inverse.timesteps]
    abar = torch.stack([a for k, a in enumerate(abar) if k == 0 or a != abar[k - 1]])
    return abar, ((1 - abar) / abar).sqrt()


def _data() -> torch.Tensor:
    return FLOW.sample((4, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().sqrt().item()


@pytest.mark.parametrize("n", [10, 50])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddim_invert_equals_diffusers_inverse_scheduler(name, n):
    inverse, forward = _schedulers(CONFIGS[name], n)
    abar, sigmas = _levels(inverse)
    x0 = _data()  # EDM state at sigmas[0] (clean when set_alpha_to_one)

    x_vp = x0 * abar[0].sqrt()
    for t in inverse.timesteps:  # the DiffEdit / pix2pix-zero inversion loop: unet(latents, t), then step(., t, .)
        x_vp = inverse.step(eps_vp(x_vp, inverse.alphas_cumprod[t]), t, x_vp).prev_sample
    ours = ddim_invert(FLOW, x0, sigmas)
    assert (ours * abar[-1].sqrt() - x_vp).abs().max().item() < 1e-10  # reached: ~5e-15 (VP scale)
    assert (ours - x_vp / abar[-1].sqrt()).abs().max().item() < 1e-10  # ~6e-13 in EDM scale (|x| up to ~400)
    other = ddim_invert(FLOW, x0, sigmas, convention="current-level") if sigmas[0] > 0 else None
    assert other is None or _rmse(other * abar[-1].sqrt(), x_vp) > 1e-3  # the other convention is another method

    # DDIMScheduler (eta = 0) back down the same levels is our ddim_sample
    for t in forward.timesteps:
        x_vp = forward.step(eps_vp(x_vp, forward.alphas_cumprod[t]), t, x_vp, eta=0.0).prev_sample
    back = ddim_sample(FLOW, ours, sigmas.flip(0))
    assert (back * abar[0].sqrt() - x_vp).abs().max().item() < 1e-10


def test_ddim_invert_conventions_and_levels():
    x0, up = _data(), karras_sigmas(6, 0.002, 80.0, append_zero=False).flip(0)
    with pytest.raises(ValueError, match="convention"):
        ddim_invert(FLOW, x0, up, convention="target")
    with pytest.raises(ValueError, match="start > 0"):  # the current-level step evaluates D at sigmas[0]
        ddim_invert(FLOW, x0, torch.cat([up.new_zeros(1), up]), convention="current-level")
    calls = []
    top = ddim_invert(FLOW, x0, torch.cat([up.new_zeros(1), up]), callback=calls.append)
    assert torch.isfinite(top).all() and len(calls) == 6 and calls[0]["sigma"] == 0
    assert torch.equal(calls[0]["denoised"], x0)  # a clean start is its own x0 estimate


def round_trips(steps=(10, 50)) -> dict:
    """RMSE of invert-then-`ddim_sample` per (grid, N, convention) on the Gaussian oracle: the EDM Karras grid
    sigma_min -> sigma_max (data at sigma_min) and the null-text / Stable Diffusion grid (data at abar[0])."""
    out = {}
    x0 = _data()
    for n in steps:
        grids = {"karras 0.002-80": karras_sigmas(n + 1, 0.002, 80.0, append_zero=False).flip(0),
                 "null-text (SD)": _levels(_schedulers(CONFIGS["null-text (SD)"], n)[0])[1]}
        for grid, up in grids.items():
            for convention in ("standard", "current-level"):
                rec = ddim_sample(FLOW, ddim_invert(FLOW, x0, up, convention=convention), up.flip(0))
                out[grid, n, convention] = _rmse(rec, x0)
    return out


def test_standard_convention_round_trips_better_on_the_gaussian_oracle():
    errs = round_trips()
    for (grid, n, convention), err in errs.items():
        ratio = errs[grid, n, "current-level"] / errs[grid, n, "standard"]
        print(f"round trip {grid:16s} N={n:3d} {convention:14s} RMSE {err:.3e} MSE {err**2:.3e} "
              f"(current-level / standard: {ratio:.2f}x)")
    for (grid, n, convention), err in errs.items():
        if convention == "standard":
            assert err < errs[grid, n, "current-level"]
            assert err < 0.25 * math.sqrt(10 / n)  # first order: O(1/N)
