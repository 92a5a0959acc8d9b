"""Noise-level schedules and consistency-model sampling plans.

Schedules are 1-D float64 tensors of EDM sigmas (float64 so grid values such as sigma_min are exact;
samplers read them as Python floats). Descending for sampling, ascending for inversion.

A *plan* is a tuple of steps executed by `restore.engine.sampling.sample_plan`:

- ``Jump(t, u)``: one network evaluation moving the state from noise level t to u (u < t denoises,
  u > t inverts / "amplifies noise"; a classic CM only supports u = sigma_min);
- ``Renoise(sigma, std)``: add ``std * z`` to the state (std defaults to sigma) and from then on treat
  it as the point at noise level ``sigma``.

So any sigma list is accepted, and the BCM paper schedules (docs/methods.md#bcm-sampling) are plain data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  append_zero: bool = True, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Karras et al. (2022) Eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho,
    i = 0..n-1, descending from sigma_max to sigma_min, followed by 0 when ``append_zero``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, (sigma_min if n > 1 else sigma_max)  # exact end points
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


class Jump(NamedTuple):
    """One network evaluation f(x, t, u)."""

    t: float
    u: float


class Renoise(NamedTuple):
    """x <- x + std z (std = sigma when None); the result is treated as the point at noise level ``sigma``."""

    sigma: float
    std: float | None = None


Step = Jump | Renoise
Plan = tuple[Step, ...]


def check_plan(plan: Sequence[Step]) -> Plan:
    """Validate a plan: starts with a jump, levels positive, every jump starts where the state is."""
    plan = tuple(plan)
    if not plan or not isinstance(plan[0], Jump):
        raise ValueError("a plan must start with a Jump")
    level = plan[0].t
    for i, step in enumerate(plan):
        if isinstance(step, Jump):
            if not (step.t > 0 and step.u > 0):
                raise ValueError(f"step {i}: noise levels must be > 0, got {step}")
            if not math.isclose(step.t, level, rel_tol=1e-9):
                raise ValueError(f"step {i}: jump starts at t={step.t} but the state is at {level}")
            level = step.u
        elif isinstance(step, Renoise):
            if not step.sigma > 0 or (step.std is not None and step.std < 0):
                raise ValueError(f"step {i}: need sigma > 0 and std >= 0, got {step}")
            level = step.sigma
        else:
            raise ValueError(f"step {i}: expected Jump or Renoise, got {step!r}")
    return plan


def plan_nfe(plan: Sequence[Step]) -> int:
    """Network evaluations a plan costs (one per jump)."""
    return sum(isinstance(s, Jump) for s in plan)


def _levels(sigmas) -> list[float]:
    return [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]


def ancestral_plan(sigmas) -> Plan:
    """Deterministic long jumps x_{i+1} = f(x_i, sigma_i, sigma_{i+1}) along ``sigmas`` (BCM "ancestral"
    sampling, docs/methods.md#bcm-sampling; CTM with gamma = 0). Ascending ``sigmas`` give a multi-step inversion.
    """
    s = _levels(sigmas)
    if len(s) < 2:
        raise ValueError("need at least two noise levels")
    return check_plan(Jump(a, b) for a, b in zip(s[:-1], s[1:]))


def zigzag_plan(sigmas, amplify: Sequence[tuple[float, float]] = ()) -> Plan:
    """BCM zigzag sampling (docs/methods.md#bcm-sampling): an ancestral pass along ``sigmas`` (ending at the output
    level), then for each ``(noise, t_up)`` in ``amplify``: add N(0, noise^2), treat the result as the point at
    t = noise, jump *up* to t_up ("noise amplification") and jump back down to ``sigmas[-1]``.

    NFE = len(sigmas) - 1 + 2 len(amplify).
    """
    s = _levels(sigmas)
    steps: list[Step] = list(ancestral_plan(s))
    for noise, t_up in amplify:
        steps += [Renoise(float(noise)), Jump(float(noise), float(t_up)), Jump(float(t_up), s[-1])]
    return check_plan(steps)


def cm_multistep_plan(sigmas, sigma_min: float = 0.002) -> Plan:
    """Consistency-model multistep sampling (Song et al. 2023, Algorithm 1): denoise from sigmas[0] to
    sigma_min, re-noise with sqrt(sigma_i^2 - sigma_min^2) z to reach level sigma_i exactly, denoise, repeat.

    ``sigmas`` are the descending levels the model is evaluated at (all > sigma_min); a trailing 0 or
    sigma_min (as produced by `karras_sigmas`) is dropped. NFE = number of remaining levels.
    """
    s = _levels(sigmas)
    while s and (s[-1] == 0 or math.isclose(s[-1], sigma_min, rel_tol=1e-6)):
        s.pop()
    if not s or any(v <= sigma_min for v in s) or any(b >= a for a, b in zip(s[:-1], s[1:])):
        raise ValueError(f"need strictly descending levels above sigma_min={sigma_min}, got {sigmas}")
    steps: list[Step] = [Jump(s[0], sigma_min)]
    for t in s[1:]:
        steps += [Renoise(t, math.sqrt(t * t - sigma_min * sigma_min)), Jump(t, sigma_min)]
    return check_plan(steps)


# docs/methods.md#bcm-sampling (official ImageNet-64 BCM sampling script): per NFE, the intermediate levels of the
# deterministic ancestral pass and the (noise, t_up) zigzag pairs.
BCM_PAPER_SCHEDULES: dict[int, tuple[tuple[float, ...], tuple[tuple[float, float], ...]]] = {
    1: ((), ()),  # one-step 80 -> 0.002
    2: ((2.4,), ()),  # "ancestral" 80 -> 2.4 -> 0.002
    3: ((), ((0.1, 1.2),)),  # zigzag: 80 -> 0.002, +N(0, 0.1^2), 0.1 -> 1.2 -> 0.002
    4: ((3.0,), ((0.12, 0.4),)),  # mixed: 80 -> 3.0 -> 0.002, +N(0, 0.12^2), 0.12 -> 0.4 -> 0.002
}


def bcm_paper_plan(nfe: int, sigma_max: float = 80.0, sigma_min: float = 0.002) -> Plan:
    """The BCM paper's sampling chain for ``nfe`` in 1..4 (docs/methods.md#bcm-sampling)."""
    if nfe not in BCM_PAPER_SCHEDULES:
        raise ValueError(f"the BCM paper defines NFE {sorted(BCM_PAPER_SCHEDULES)}, got {nfe}")
    mid, amplify = BCM_PAPER_SCHEDULES[nfe]
    return zigzag_plan((sigma_max, *mid, sigma_min), amplify)
