"""Exact diffusion inversion on an EDM denoiser, in sigma-space: DDIM, BDIA-DDIM (and O-BELM), BDIA-EDM, EDICT.

Everything is written in the variance-exploding (EDM) coordinates x_sigma = x_0 + sigma z, where the DDIM
transfer between two noise levels is an explicit Euler step of the PF ODE dx/dsigma = (x - D(x; sigma))/sigma
(Karras et al. 2022, Eq. 3; docs/methods.md#exact-inversion):

    T_{a->b}(x_a) = x0_hat + (sigma_b / sigma_a) (x_a - x0_hat),   x0_hat = D(x_a; sigma_a)     (`ddim_step`)

It goes down (b < a, sampling) or up (b > a, inversion); `restore.engine.sampling.ddim_step` is the one
implementation. The VP formulas of the papers map to this form with alpha = 1 and sigma = the EDM noise level
(x_VP = x / sqrt(1 + sigma^2), abar = 1 / (1 + sigma^2); docs/methods.md#exact-inversion); every deviation is listed per
function. DDIM inversion defaults to the field's convention (diffusers, null-text inversion: the network is called on
the current sample with the target level's label), which is not the T_{a->b} above; see `ddim_invert`.

k-diffusion-style free functions ``f(model, x, sigmas, ..., *, generator=None, callback=None, extra_args=None)``:

- ``model(x, sigma, **extra_args) -> x0_hat`` (an `restore.engine.wrappers.EDMDenoiser`; its wrapper counts the NFE);
- ``sigmas``: 1-D levels as from `restore.engine.schedules.karras_sigmas` -- **descending** for the samplers (may end
  in 0), **ascending** for the inversions (must start > 0: the ODE is singular at 0; standard DDIM inversion may start
  at 0), as `restore.engine.sampling` does; regenerate with the inversion's levels reversed, ``sigmas.flip(0)``;
- ``callback(d)`` once per network call (BDIA-EDM: once per step, its Heun correction is not reported) with keys
  ``x``, ``i``, ``sigma``, ``sigma_next``, ``denoised``;
- ``generator`` is accepted for interchangeability and ignored (all are deterministic).

Exactness: BDIA and EDICT inversions are the algebraic inverses of their samplers, so the round trip
``*_sample(model, *_invert(model, x, s), s.flip(0))`` returns ``x`` up to rounding, amplified by 1/gamma (BDIA)
or 1/p^2 (EDICT) per step (docs/methods.md#exact-inversion). DDIM inversion is only first-order accurate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from operators.utils import Generator
from restore.engine.sampling import Callback, check_monotone, ddim_step, pf_ode_step

Pair = tuple[torch.Tensor, torch.Tensor]
Gamma = float | str | Sequence[float] | torch.Tensor  # str: "obelm" (`obelm_gammas` of the levels)


def _levels(sigmas, descending: bool, zero_start: bool = False) -> list[float]:
    check_monotone(sigmas, descending=descending, zero_start=zero_start)
    return [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]


__all__ = ["DDIM_CONVENTIONS", "bdia_invert", "bdia_sample", "ddim_invert", "ddim_sample", "edict_invert",
           "edict_sample", "obelm_gammas"]


def _denoise(model, x: torch.Tensor, i: int, sigma: float, sigma_next: float, callback: Callback,
             extra_args: dict | None) -> torch.Tensor:
    """One counted network call D(x; sigma), reported to ``callback``."""
    denoised = model(x, sigma, **(extra_args or {}))
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return denoised


# --------------------------------------------------------------------------------------------------- DDIM
def ddim_sample(model, x: torch.Tensor, sigmas, *, generator: Generator = None, callback: Callback = None,
                extra_args: dict | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling x_{i+1} = T_{i->i+1}(x_i) along descending ``sigmas`` (Song et al. 2021, Eq. 12
    with eta = 0, in the ODE form of Eq. 13; docs/methods.md#ddim-inversion); equal to diffusers' ``DDIMScheduler`` with
    eta = 0 on the matching levels (tests/test_ddim_diffusers.py) and to `restore.engine.sampling.sample_euler` (the
    same `ddim_step`). NFE = len(sigmas) - 1."""
    s = _levels(sigmas, descending=True)
    for i in range(len(s) - 1):
        denoised = _denoise(model, x, i, s[i], s[i + 1], callback, extra_args)
        x = ddim_step(x, (x - denoised) / s[i], s[i], s[i + 1])
    return x


DDIM_CONVENTIONS = ("standard", "current-level")


def ddim_invert(model, x: torch.Tensor, sigmas, *, convention: str = "standard", generator: Generator = None,
                callback: Callback = None, extra_args: dict | None = None) -> torch.Tensor:
    """DDIM inversion: the deterministic DDIM update (Song et al. 2021, Eq. 13, the Euler form of their ODE Eq. 14,
    run backwards to encode, §4.3) taken uphill along ascending ``sigmas``. ``x`` is the state at ``sigmas[0]``;
    returns the state at ``sigmas[-1]``. Not exact: the round trip through `ddim_sample` has an O(1/N) error
    (docs/methods.md#ddim-inversion). NFE = len(sigmas) - 1. Two conventions for where the network is evaluated:

    ``"standard"`` (default): the field's DDIM inversion, that of diffusers' ``DDIMInverseScheduler`` (the loop
    ``eps = unet(x, t); x = step(eps, t, x)`` over ascending t) and of null-text inversion (Mokady et al. 2023,
    CVPR; its DDIM-inversion loop). A step from level t_i to t_{i+1} calls the network on the *current* sample
    with the *target* label t_{i+1}, removes that noise estimate with the current level's alpha and adds it back
    with the target's: in VP terms eps = eps_theta(x_vp, t_{i+1}), x0_hat = (x_vp - sqrt(1 - abar_i) eps) /
    sqrt(abar_i), x_vp' = sqrt(abar_{i+1}) x0_hat + sqrt(1 - abar_{i+1}) eps. In EDM terms (x = x_vp / sqrt(abar),
    sigma = sqrt((1 - abar) / abar)) the network sees the same VP sample read at level sigma', i.e. the EDM input
    x_in = x sqrt((1 + sigma'^2) / (1 + sigma^2)) at sigma', so eps_hat = (x_in - D(x_in; sigma')) / sigma' and
    x' = `ddim_step`(x, eps_hat, sigma, sigma') (tests/test_ddim_diffusers.py: equal to diffusers to rounding).
    ``sigmas[0]`` may be 0: the input is then clean and the first step x' = x + sigma_1 eps_hat (diffusers'
    ``set_alpha_to_one=True``); the network is never called at level 0.

    ``"current-level"``: x0_hat = D(x; sigma) at the current state *and* level, i.e. the explicit Euler step of
    the PF ODE upwards (= `restore.engine.sampling.edm_ode_invert` with ``method="euler"``; the step BDIA's
    exact inversion starts with; docs/methods.md#ddim-inversion compares both). ``sigmas`` must start > 0.

    The callback gets ``x`` (the state at ``sigma``), ``sigma``, ``sigma_next`` and ``denoised``: the clean
    estimate the step moves from, x0_hat = x - sigma eps_hat (for "current-level" D(x; sigma) itself).
    """
    if convention not in DDIM_CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(DDIM_CONVENTIONS)}, got {convention!r}")
    s = _levels(sigmas, descending=False, zero_start=convention == "standard")
    for i in range(len(s) - 1):
        if convention == "current-level":
            denoised = _denoise(model, x, i, s[i], s[i + 1], callback, extra_args)
            x = ddim_step(x, (x - denoised) / s[i], s[i], s[i + 1])
            continue
        x_in = x * math.sqrt((1 + s[i + 1] ** 2) / (1 + s[i] ** 2))  # the same VP sample, read at the target level
        eps = (x_in - model(x_in, s[i + 1], **(extra_args or {}))) / s[i + 1]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s[i], "sigma_next": s[i + 1], "denoised": x - s[i] * eps})
        x = ddim_step(x, eps, s[i], s[i + 1])
    return x


# --------------------------------------------------------------------------------------------------- BDIA
def _gammas(gamma: Gamma, levels: list[float]) -> list[float]:
    """gamma per level: a scalar, "obelm" (`obelm_gammas` of ``levels``) or one value per level (entry k is used
    by the step centred at levels[k]; the entries of the two end levels are never used)."""
    n = len(levels)
    if isinstance(gamma, (int, float)):
        return [float(gamma)] * n
    if isinstance(gamma, str):
        if gamma != "obelm":
            raise ValueError(f"gamma must be a number, 'obelm' or one value per level, got {gamma!r}")
        return obelm_gammas(levels).tolist()
    g = [float(v) for v in (gamma.tolist() if isinstance(gamma, torch.Tensor) else gamma)]
    if len(g) != n:
        raise ValueError(f"gamma must be a scalar or have one value per level ({n}), got {len(g)}")
    return g


def obelm_gammas(sigmas) -> torch.Tensor:
    """The per-level gamma that turns BDIA-DDIM into O-BELM (Wang et al. 2024, NeurIPS; docs/methods.md#o-belm-gamma):
    gamma_k = (h_fwd / h_back)^2, with h_fwd the step from sigma_k towards the data and h_back the step from
    the noisier neighbour to sigma_k (alpha ratio = 1 in VE form). It cancels BDIA's O(h^2) local error
    (local error O(h^3)). Aligned with ``sigmas`` in either order; end entries are 1 (unused).

    On a geometric grid of ratio r = sigma_k/sigma_{k+1}, gamma_k = 1/r^2 < 1/r, which keeps the parasitic root
    -gamma r of a locally constant denoiser inside the unit circle (`bdia_sample`); the inversion divides by these
    small gamma_k, yet its measured round trips stay at rounding level (tests/test_exact_inversion.py)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    desc = s if bool(s[0] > s[-1]) else s.flip(0)
    g = torch.ones_like(desc)
    g[1:-1] = ((desc[1:-1] - desc[2:]) / (desc[:-2] - desc[1:-1])) ** 2
    return g if bool(s[0] > s[-1]) else g.flip(0)


def _transfer(model, x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float, heun: bool,
              extra_args: dict | None) -> torch.Tensor:
    """BDIA's forward increment from the current state: the DDIM (Euler) step, or with ``heun`` EDM's Heun step
    reusing D(x; sigma) (one more NFE; Euler when landing on 0)."""
    if not heun:
        return ddim_step(x, (x - denoised) / sigma, sigma, sigma_next)
    return pf_ode_step(model, x, sigma, sigma_next, denoised=denoised, extra_args=extra_args)[0]


def bdia_sample(model, x: torch.Tensor | Pair, sigmas, gamma: Gamma = 1.0, *, heun: bool = False,
                generator: Generator = None, callback: Callback = None, extra_args: dict | None = None) -> torch.Tensor:
    """BDIA-DDIM sampling (Zhang, Lewis & Kleijn 2024, "Exact diffusion inversion via bi-directional integration
    approximation", ECCV; closed form of the official code, docs/methods.md#bdia), in VE form: with
    x0_hat = D(x_i; sigma_i) and the DDIM transfers T of `ddim_step`,

        x_{i+1} = gamma_i (x_{i-1} - T_{i->i-1}(x_i)) + T_{i->i+1}(x_i)      (indices follow descending sigmas)

    = gamma x_{i-1} + (1 - gamma) x_i + [(sigma_{i+1} - sigma_i) - gamma (sigma_{i-1} - sigma_i)] d_i
    (docs/methods.md#bdia, "pure Euler"). gamma = 0 is DDIM, gamma = 1 the leapfrog form of arXiv v1; the current
    official convention (gamma = 0 -> DDIM) is used. ``gamma``: scalar or one value per level (`obelm_gammas`
    gives O-BELM).

    ``heun=True`` is **BDIA-EDM** (the paper applies BDIA to EDM's Heun sampler; docs/methods.md#bdia-edm): the forward
    increment T_{i->i+1} is EDM's Heun step (Karras et al. 2022, Algorithm 1) and the backward one stays the Euler
    step with the same D(x_i; sigma_i), so the update stays explicit in x_{i-1} and exactly invertible at EDM's cost
    (2 NFE per step, the last step to 0 Euler). Deviation: the paper's exact BDIA-EDM formula is not in our
    references; this is the invertible instantiation of its template (variant A of docs/methods.md#bdia-edm).

    ``x``: a tensor at ``sigmas[0]`` (the first step is then plain DDIM / Heun, §3.3), or the pair
    ``(x at sigmas[0], x at sigmas[1])`` returned by `bdia_invert` (regeneration: BDIA steps only, §3.4 step 5).
    NFE = len(sigmas) - 1 from a tensor, len(sigmas) - 2 from a pair (twice that with ``heun``, minus one when the
    last level is 0). Returns the state at ``sigmas[-1]``.

    Stability (ours; docs/methods.md#bdia neglects the denoiser's Jacobian): where D is locally constant (high
    noise, memorising priors) a perturbation e obeys e_{i+1} = gamma (e_{i-1} - r e_i) + e_i / r on a grid of
    ratio r = sigma_{i-1}/sigma_i = sigma_i/sigma_{i+1}, with roots 1/r and -gamma r: gamma must stay below 1/r
    for perturbations (rounding, or data-consistency edits of the regeneration) to decay.
    """
    s = _levels(sigmas, descending=True)
    g = _gammas(gamma, s)
    x_prev, x = x if isinstance(x, tuple) else (None, x)
    for i in range(0 if x_prev is None else 1, len(s) - 1):
        denoised = _denoise(model, x, i, s[i], s[i + 1], callback, extra_args)
        x_next = _transfer(model, x, denoised, s[i], s[i + 1], heun, extra_args)
        if x_prev is not None:
            x_next = g[i] * (x_prev - ddim_step(x, (x - denoised) / s[i], s[i], s[i - 1])) + x_next
        x_prev, x = x, x_next
    return x


def bdia_invert(model, x: torch.Tensor, sigmas, gamma: Gamma = 1.0, *, heun: bool = False,
                generator: Generator = None, callback: Callback = None, extra_args: dict | None = None) -> Pair:
    """Exact BDIA-DDIM inversion (Zhang et al. 2024; official editing code; docs/methods.md#bdia): solve the
    `bdia_sample` step for the noisier state,

        x_{i+1} = (x_{i-1} - T_{i->i-1}(x_i)) / gamma_i + T_{i->i+1}(x_i)      (indices follow ascending sigmas)

    with x0_hat = D(x_i; sigma_i) at the current state and level, the triple `bdia_sample` uses. The first step
    sigmas[0] -> sigmas[1] is a current-level DDIM inversion step (``ddim_invert(..., convention="current-level")``,
    as in BDIA's editing code; it only selects the trajectory and is never undone). With ``heun`` (BDIA-EDM) the
    downward transfer T_{i->i-1} is the Heun step of `bdia_sample` and the first step a Heun step up; NFE doubles.
    ``gamma``: scalar or per level of ``sigmas`` (for a per-level array computed on the sampling grid pass it
    flipped); every used value must be > 0 -- rounding is amplified by about prod(1/gamma_i) (§3.5a), so gamma
    < 0.9 is unsafe beyond ~20 steps. ``x`` is the state at ``sigmas[0]``.

    Returns the **pair** (x at sigmas[-1], x at sigmas[-2]): regenerate with
    ``bdia_sample(model, pair, sigmas.flip(0), gamma_flipped, heun=heun)``. NFE = len(sigmas) - 1 (x2 with ``heun``).
    """
    s = _levels(sigmas, descending=False)
    g = _gammas(gamma, s)
    if any(v <= 0 for v in g[1:-1]):
        raise ValueError("exact BDIA inversion divides by gamma: every gamma must be > 0 (use ddim_invert for 0)")
    x_prev = None
    for i in range(len(s) - 1):
        denoised = _denoise(model, x, i, s[i], s[i + 1], callback, extra_args)
        if x_prev is None:
            x_next = _transfer(model, x, denoised, s[i], s[i + 1], heun, extra_args)
        else:
            down = _transfer(model, x, denoised, s[i], s[i - 1], heun, extra_args)
            x_next = (x_prev - down) / g[i] + ddim_step(x, (x - denoised) / s[i], s[i], s[i + 1])
        x_prev, x = x, x_next
    return x, x_prev


# -------------------------------------------------------------------------------------------------- EDICT
def _edict_eps(model, z: torch.Tensor, i: int, sigma: float, sigma_next: float, callback: Callback,
               extra_args: dict | None) -> torch.Tensor:
    """eps_hat(z; sigma) = (z - D(z; sigma))/sigma: the other sequence's noise estimate that drives a DDIM step."""
    return (z - _denoise(model, z, i, sigma, sigma_next, callback, extra_args)) / sigma


def _check_p(p: float) -> None:
    if not 0 < p <= 1:
        raise ValueError(f"EDICT mixing p must be in (0, 1], got {p}")


def edict_sample(model, x: torch.Tensor | Pair, sigmas, p: float = 0.93, leapfrog: bool = True, *,
                 return_pair: bool = False, generator: Generator = None, callback: Callback = None,
                 extra_args: dict | None = None) -> torch.Tensor | Pair:
    """EDICT sampling (Wallace, Gokul & Naik 2023, "EDICT: exact diffusion inversion via coupled
    transformations", CVPR; the update of the official edict_functions.py, docs/methods.md#edict -- paper
    equation numbers not verified), VE form (a_i = 1, b_i = sigma_{i+1} - sigma_i,
    eps_hat = (z - D(z; sigma_i))/sigma_i). Per step i (sigma_i -> sigma_{i+1}):

        x' = x + b eps(y; sigma_i);  y' = y + b eps(x'; sigma_i);  x <- p x' + (1-p) y';  y <- p y' + (1-p) x

    (x + b eps is `ddim_step` driven by the other sequence's eps; eps of x' uses label sigma_i although x' is at
    sigma_{i+1}, as in the paper). ``leapfrog`` swaps the roles of x and y on odd steps (official code default).
    ``x``: a tensor (x = y) or the pair from `edict_invert`. Returns x (or the pair with ``return_pair``).
    NFE = 2 (len(sigmas) - 1).
    """
    _check_p(p)
    s = _levels(sigmas, descending=True)
    x, y = x if isinstance(x, tuple) else (x, x)
    for i in range(len(s) - 1):
        if leapfrog and i % 2:
            x, y = y, x
        x_inter = ddim_step(x, _edict_eps(model, y, i, s[i], s[i + 1], callback, extra_args), s[i], s[i + 1])
        y_inter = ddim_step(y, _edict_eps(model, x_inter, i, s[i], s[i + 1], callback, extra_args), s[i], s[i + 1])
        x = p * x_inter + (1 - p) * y_inter
        y = p * y_inter + (1 - p) * x
        if leapfrog and i % 2:
            x, y = y, x
    return (x, y) if return_pair else x


def edict_invert(model, x: torch.Tensor | Pair, sigmas, p: float = 0.93, leapfrog: bool = True, *,
                 generator: Generator = None, callback: Callback = None, extra_args: dict | None = None) -> Pair:
    """Exact EDICT inversion (Wallace et al. 2023; official code, docs/methods.md#edict): the `edict_sample` step undone
    in reverse order along ascending ``sigmas``,

        y' = (y - (1-p) x)/p;  x' = (x - (1-p) y')/p;  y <- y' - b eps(x'; sigma_hi);  x <- x' - b eps(y; sigma_hi)

    with b = sigma_lo - sigma_hi (`ddim_step` from sigma_lo back to sigma_hi) and the leapfrog parity of the
    corresponding sampling step. ``x``: a tensor (x = y) or a pair at ``sigmas[0]``. Returns the pair (x, y) at
    ``sigmas[-1]``; regenerate with ``edict_sample(model, pair, sigmas.flip(0), p, leapfrog)``. Disagreement x - y
    grows by 1/p^2 per step (§4.2). NFE = 2 (len(sigmas) - 1). The callback reports sigma = sigma_hi (the label) and
    sigma_next = sigma_lo.
    """
    _check_p(p)
    s = _levels(sigmas, descending=False)
    x, y = x if isinstance(x, tuple) else (x, x)
    n = len(s) - 1
    for j in range(n):
        step = n - 1 - j  # index of this step in the sampling direction (leapfrog parity)
        lo, hi = s[j], s[j + 1]
        if leapfrog and step % 2:
            x, y = y, x
        y_inter = (y - (1 - p) * x) / p
        x_inter = (x - (1 - p) * y_inter) / p
        y = ddim_step(y_inter, _edict_eps(model, x_inter, j, hi, lo, callback, extra_args), lo, hi)  # the step back
        x = ddim_step(x_inter, _edict_eps(model, y, j, hi, lo, callback, extra_args), lo, hi)
        if leapfrog and step % 2:
            x, y = y, x
    return x, y
