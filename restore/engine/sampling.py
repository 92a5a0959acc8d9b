"""Samplers: consistency / BCM plans and the EDM probability-flow ODE (forward and inverse).

All are free functions with a k-diffusion-style signature
``sample_*(model, x, <schedule>, *, generator=None, callback=None, extra_args=None) -> Tensor``:

- ``model``: a wrapper from `restore.engine.wrappers` (``model.jump`` for plans, ``model(x, sigma)`` for the ODE);
  any callable with the same interface works (e.g. `restore.engine.oracles.EmpiricalDenoiser`).
- ``generator``: None, a ``torch.Generator`` or one per image (`operators.utils.randn`); deterministic
  samplers accept it so that samplers are interchangeable, and ignore it.
- ``callback(d)`` is called once per network step with keys ``x`` (state before the step), ``i``,
  ``sigma``, ``sigma_next`` and ``denoised`` (the model output: the x0 estimate for the ODE samplers,
  the jump result x_u for plans).
- ``extra_args``: keyword arguments for the model (``class_labels=...``, ``cond=...``).

`pf_ode_step` is the single Euler / Heun step of the PF ODE (per-image noise levels allowed) that the ODE samplers
and the distillation loss (`training.losses.BCDLoss`) share.

No ``torch.no_grad``: callers pick ``torch.inference_mode()`` when they do not need gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from operators.utils import Generator, randn
from restore.engine.schedules import (
    Jump,
    Step,
    ancestral_plan,
    bcm_paper_plan,
    check_plan,
    cm_multistep_plan,
    zigzag_plan,
)

Callback = Callable[[dict], None] | None


def sample_plan(model, x: torch.Tensor, plan: Sequence[Step], *, generator: Generator = None,
                callback: Callback = None, extra_args: dict | None = None) -> torch.Tensor:
    """Execute a consistency-model plan (`restore.engine.schedules`): ``Jump(t, u)`` -> ``model.jump(x, t, u)``,
    ``Renoise(sigma, std)`` -> ``x + std z``. ``x`` is the state at ``plan[0].t``. This one executor covers
    BCM one-step, ancestral, zigzag and mixed sampling (Li & He 2024, docs/methods.md#bcm-sampling), BCM inversion, and
    CM multistep sampling (Song et al. 2023, Algorithm 1).
    """
    extra_args = extra_args or {}
    i = 0
    for step in check_plan(plan):
        if isinstance(step, Jump):
            x_next = model.jump(x, step.t, step.u, **extra_args)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": step.t, "sigma_next": step.u, "denoised": x_next})
            x, i = x_next, i + 1
        else:
            std = step.sigma if step.std is None else step.std
            x = x + std * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x


def sample_onestep(model, x: torch.Tensor, sigma: float | None = None, *, generator: Generator = None,
                   callback: Callback = None, extra_args: dict | None = None) -> torch.Tensor:
    """One-step consistency sampling x_0 = f(x_T, T, sigma_min) (Song et al. 2023; docs/methods.md#bcm-sampling).
    ``sigma`` is the level of ``x`` (default ``model.sigma_max``)."""
    t = model.sigma_max if sigma is None else float(sigma)
    return sample_plan(model, x, (Jump(t, model.sigma_min),), callback=callback, extra_args=extra_args)


def sample_ancestral(model, x: torch.Tensor, sigmas, *, generator: Generator = None, callback: Callback = None,
                     extra_args: dict | None = None) -> torch.Tensor:
    """BCM "ancestral" sampling: deterministic long jumps x_{i+1} = f(x_i, sigma_i, sigma_{i+1}) along
    ``sigmas`` (docs/methods.md#bcm-sampling, e.g. (80, 2.4, 0.002)); no fresh noise."""
    return sample_plan(model, x, ancestral_plan(sigmas), callback=callback, extra_args=extra_args)


def sample_zigzag(model, x: torch.Tensor, sigmas=(80.0, 0.002), amplify: Sequence[tuple[float, float]] = ((0.1, 1.2),),
                  *, generator: Generator = None, callback: Callback = None,
                  extra_args: dict | None = None) -> torch.Tensor:
    """BCM zigzag sampling (docs/methods.md#bcm-sampling): ancestral pass along ``sigmas``, then per ``(noise, t_up)``:
    add N(0, noise^2), jump up noise -> t_up ("noise amplification"), jump down. Defaults = the paper's NFE 3."""
    return sample_plan(model, x, zigzag_plan(sigmas, amplify), generator=generator, callback=callback,
                       extra_args=extra_args)


def sample_bcm(model, x: torch.Tensor, nfe: int, *, generator: Generator = None, callback: Callback = None,
               extra_args: dict | None = None) -> torch.Tensor:
    """BCM sampling with the paper's chain for ``nfe`` in 1..4 (`restore.engine.schedules.bcm_paper_plan`), from
    ``x`` at ``model.sigma_max`` down to ``model.sigma_min``."""
    plan = bcm_paper_plan(nfe, sigma_max=model.sigma_max, sigma_min=model.sigma_min)
    return sample_plan(model, x, plan, generator=generator, callback=callback, extra_args=extra_args)


def sample_cm_multistep(model, x: torch.Tensor, sigmas, *, generator: Generator = None, callback: Callback = None,
                        extra_args: dict | None = None) -> torch.Tensor:
    """Consistency-model multistep sampling (Song et al. 2023, Algorithm 1): denoise to sigma_min, re-noise
    with sqrt(sigma_next^2 - sigma_min^2) z, repeat; one NFE per level in ``sigmas`` (a trailing 0 or
    sigma_min is dropped, see `restore.engine.schedules.cm_multistep_plan`)."""
    plan = cm_multistep_plan(sigmas, model.sigma_min)
    return sample_plan(model, x, plan, generator=generator, callback=callback, extra_args=extra_args)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The deterministic DDIM step, which in EDM coordinates is also the Euler step of the PF ODE; the one place this
    update is written (samplers, inversions and baselines all call it):

        x' = x + (sigma_next - sigma) eps_hat = x0_hat + (sigma_next / sigma)(x - x0_hat),  eps_hat = (x - x0_hat)/sigma

    It is DDIM's update in its ODE form (Song et al. 2021, Eq. 13: x_{t-dt}/sqrt(a_{t-dt}) = x_t/sqrt(a_t) +
    (sigma_{t-dt} - sigma_t) eps_theta, whose states x/sqrt(a) are these EDM states) and the Euler step of
    dx/dsigma = (x - D(x; sigma))/sigma = eps_hat (Karras et al. 2022, Eq. 3 and Algorithm 1). Either direction
    (sigma_next below or above sigma); for the same ``eps`` the step back, ``ddim_step(x', eps, sigma_next, sigma)``,
    undoes it up to rounding (EDICT's inversion relies on this). Stochastic and data-consistent variants move a
    (modified) clean estimate from level 0, ``ddim_step(x0_hat, eps, 0, c)`` = x0_hat + c eps, and add fresh noise
    themselves (`baselines.common.renoise`, DDRM)."""
    return x + (sigma_next - sigma) * eps


def _level(v, x: torch.Tensor):
    """A noise level as used by the step arithmetic: Python floats unchanged, tensors () or (B,) broadcast to x."""
    if isinstance(v, torch.Tensor):
        v = v.to(device=x.device, dtype=x.dtype)
        return v.reshape(-1, *(1,) * (x.ndim - 1)) if v.ndim == 1 else v
    return v


def pf_ode_step(model, x: torch.Tensor, sigma, sigma_next, *, second_order: bool = True, extra_args: dict | None = None,
                denoised: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler or Heun step of the PF ODE dx/dsigma = (x - D(x; sigma))/sigma (Karras et al. 2022, Eq. 3 and
    Algorithm 1), from ``sigma`` to ``sigma_next`` (either direction); the one place the Heun step is written:

        d = (x - D(x; sigma))/sigma,  x' = x + (sigma_next - sigma) d                       (Euler, 1 NFE)
        d' = (x' - D(x'; sigma_next))/sigma_next,  x_next = x + (sigma_next - sigma)(d + d')/2   (Heun, 2 NFE)

    A step that lands on sigma_next = 0 stays Euler (Algorithm 1, line 8). ``sigma``, ``sigma_next``: floats or
    tensors of shape () or (B,) (one level per image, as in distillation, `training.losses.BCDLoss`); per-image
    levels must be all zero or all non-zero at ``sigma_next``. Returns ``(x_next, denoised)``, denoised = D(x; sigma);
    a caller that already has D(x; sigma) passes it as ``denoised`` (one NFE less, e.g. BDIA-EDM).
    """
    extra_args = extra_args or {}
    if denoised is None:
        denoised = model(x, sigma, **extra_args)
    s, s_next = _level(sigma, x), _level(sigma_next, x)
    d = (x - denoised) / s  # evaluate dx/dsigma at (x_i, sigma_i)
    x_next = ddim_step(x, d, s, s_next)  # Euler step (d = eps_hat in EDM coordinates)
    if isinstance(sigma_next, torch.Tensor):
        landing = bool((sigma_next == 0).any())
        if landing and not bool((sigma_next == 0).all()):
            raise ValueError("per-image sigma_next must be all zero or all non-zero")
    else:
        landing = sigma_next == 0
    if second_order and not landing:
        d_prime = (x_next - model(x_next, sigma_next, **extra_args)) / s_next
        x_next = x + (s_next - s) * (d + d_prime) / 2  # apply the 2nd-order (trapezoidal) correction
    return x_next, denoised


def _probability_flow(model, x: torch.Tensor, sigmas, second_order: bool, callback: Callback,
                      extra_args: dict | None) -> torch.Tensor:
    """Integrate dx/dsigma = (x - D(x; sigma))/sigma (Karras et al. 2022, Eq. 3 with sigma(t) = t) along
    ``sigmas`` (either direction) with Euler or Heun steps (`pf_ode_step`, Algorithm 1)."""
    s = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    for i, (sigma, sigma_next) in enumerate(zip(s[:-1], s[1:])):
        x_next, denoised = pf_ode_step(model, x, sigma, sigma_next, second_order=second_order, extra_args=extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
        x = x_next
    return x


def check_monotone(sigmas, descending: bool, zero_start: bool = False) -> None:
    """Levels strictly monotone, >= 0 and starting > 0 (ODE steps divide by the start level); ``zero_start``
    also allows sigmas[0] = 0 (for steps that never evaluate the model there, e.g. standard DDIM inversion)."""
    s = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(s) < 2:
        raise ValueError("need at least two noise levels")
    pairs = list(zip(s[:-1], s[1:]))
    ok = all(a > b for a, b in pairs) if descending else all(a < b for a, b in pairs)
    if not ok or min(s) < 0 or (s[0] == 0 and not zero_start):
        raise ValueError(f"noise levels must be strictly {'de' if descending else 'a'}scending, >= 0, "
                         f"and start > 0: {s}")


def sample_euler(model, x: torch.Tensor, sigmas, *, generator: Generator = None, callback: Callback = None,
                 extra_args: dict | None = None) -> torch.Tensor:
    """Deterministic Euler sampler for the EDM PF ODE (Karras et al. 2022, Algorithm 1 without the
    correction): one NFE per step. ``sigmas`` descending, e.g. `karras_sigmas(n)` ending in 0 (the last
    step then returns D(x; sigma_{n-1})) or ending at sigma_min (the output is the state at sigma_min)."""
    check_monotone(sigmas, descending=True)
    return _probability_flow(model, x, sigmas, False, callback, extra_args)


def sample_heun(model, x: torch.Tensor, sigmas, *, generator: Generator = None, callback: Callback = None,
                extra_args: dict | None = None) -> torch.Tensor:
    """Deterministic Heun sampler (Karras et al. 2022, Algorithm 1; EDM's ``edm_sampler`` with S_churn = 0).
    With ``sigmas = karras_sigmas(n)`` (ending in 0) the last step is Euler, so NFE = 2n - 1; with sigmas
    ending at sigma_min every step is Heun (NFE = 2 (len(sigmas) - 1)) and the output is the state at sigma_min."""
    check_monotone(sigmas, descending=True)
    return _probability_flow(model, x, sigmas, True, callback, extra_args)


def edm_ode_invert(model, x0: torch.Tensor, sigmas, *, method: str = "heun", generator: Generator = None,
                   callback: Callback = None, extra_args: dict | None = None) -> torch.Tensor:
    """Invert an image to noise by integrating the EDM PF ODE upwards (Karras et al. 2022, Eq. 3; the
    deterministic encoder of Song et al. 2021, §4.3) with Heun (2 NFE/step) or Euler (1 NFE/step) steps.

    ``sigmas`` ascending, e.g. ``karras_sigmas(n, append_zero=False).flip(0)`` (sigma_min -> sigma_max):
    ``x0`` is taken as the state at ``sigmas[0]`` (the ODE is singular at 0). Sampling back with
    `sample_heun` on the same levels reversed reproduces ``x0`` up to the discretisation error.
    """
    if method not in ("heun", "euler"):
        raise ValueError(f"method must be 'heun' or 'euler', got {method!r}")
    check_monotone(sigmas, descending=False)
    return _probability_flow(model, x0, sigmas, method == "heun", callback, extra_args)
