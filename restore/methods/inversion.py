"""Zero-shot restoration by exact diffusion inversion on an EDM prior: the exact-inversion counterpart of BCM's
"invert to an intermediate noise level, regenerate" restoration (docs/methods.md#bcm-restoration).

Pipeline of `restore_bdia_restore` (registered as ``bdia-restore``):

1. start: x = A^+(y) (linear operators; y itself otherwise, e.g. the decoded JPEG), plus ``noise`` z, taken as
   the PF-ODE state at ``sigma_in`` -- BCM's small-noise trick (docs/methods.md#bcm-inversion: noise = t = 0.07);
2. invert along a Karras grid (rho = 7) sigma_in -> sigma_s with ``method``: "bdia" (BDIA-DDIM, exact,
   returns a pair), "edict" (exact, pair) or "ddim" (approximate; the field's standard DDIM inversion, that of
   diffusers and null-text inversion, `restore.engine.exact_inversion.ddim_invert`'s default);
3. regenerate along the same grid sigma_s -> sigma_in with the matching sampler, then one DDIM (Euler) step
   sigma_in -> 0, which returns the denoiser output D(x; sigma_in);
4. data consistency ``dc``: "step" projects every x0 estimate of step 3 onto {x : A x = y} with ``op.project``
   (DDNM's range-null-space step on x0_hat, Wang et al. 2023, Eq. 7, here inside the exact sampler) and the
   output; "end" projects only the output; "none" is blind (``op`` is then only used for A^+).

What exactness implies: without data consistency an exact inversion is undone exactly by regeneration, so the
output is D(x_start; sigma_in) whatever sigma_s and the number of steps (tested): the restoration comes
only from the final denoising at sigma_in and from the data-consistency steps, which make the regeneration
leave the inverted trajectory. An approximate inversion (DDIM here, BCM's jumps in restore.engine.bcm_inversion) instead
regenerates a different image; that difference is what a BCM-vs-BDIA comparison on the same task measures.

Deviations: BDIA/EDICT are defined for VP latents; they run here in EDM sigma-space (restore.engine.exact_inversion);
the data-consistency variant is ours (the papers do editing, not restoration).
"""

from __future__ import annotations

import torch

from operators.utils import Generator, randn
from restore.engine.exact_inversion import (
    bdia_invert,
    bdia_sample,
    ddim_invert,
    ddim_sample,
    edict_invert,
    edict_sample,
)
from restore.engine.sampling import Callback
from restore.engine.schedules import karras_sigmas
from restore.engine.wrappers import class_conditioning
from restore.methods import Choice, Float, register_method

METHODS = ("bdia", "edict", "ddim")
DC_MODES = ("step", "end", "none")
# Counted NFE for N grid steps: (fixed, per step). bdia: N inversion + (N - 1) regeneration steps from the pair
# + 1 final; ddim: N + N + 1; edict: 2N + 2N + 1. With N = 0 only the final denoising step runs (NFE 1).
_COST = {"bdia": (0, 2), "ddim": (1, 2), "edict": (1, 4)}


def inversion_steps(method: str, nfe: int) -> int:
    """Grid steps N between sigma_in and sigma_s that fit in ``nfe`` counted NFE (0 when nfe is too small
    for one step: then the method is a single denoising step, which an exact inversion gives anyway)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    fixed, per_step = _COST[method]
    return max(0, (nfe - fixed) // per_step)


def inversion_nfe(method: str, steps: int) -> int:
    """Counted NFE of `restore_bdia_restore` with ``steps`` grid steps (inverse of `inversion_steps`)."""
    fixed, per_step = _COST[method]
    return max(1, fixed + per_step * steps)


@register_method("bdia-restore", blind=False, model="edm", default_nfe=20,
                 space={"sigma_s": Float(0.2, 40.0, log=True), "gamma": Choice(("obelm", 0.5, 0.9, 0.96, 1.0)),
                        "noise": Float(0.005, 0.5, log=True)})
def restore_bdia_restore(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None,
                         callback: Callback = None, method: str = "bdia", sigma_s: float = 5.0,
                         sigma_in: float = 0.07, noise: float = 0.07, gamma: float | str = "obelm", p: float = 0.93,
                         dc: str = "step", class_labels=None) -> torch.Tensor:
    """Exact diffusion inversion (BDIA / EDICT; DDIM for reference) to sigma_s, then regeneration with data
    consistency (module docstring). ``nfe``: budget; the counted NFE is `inversion_nfe(method,
    inversion_steps(method, nfe))` <= nfe (inversion + regeneration + 1 final step; minimum 1).

    Hyper-parameters: ``method`` in bdia|edict|ddim; ``sigma_s`` top of the inversion (5.0, untuned; the BCM
    restorers use 0.5-2 per task); ``sigma_in`` the level the input is treated at and ``noise`` the std of the
    noise added to it (BCM's 0.07 trick; noise = 0 makes the method deterministic); ``gamma`` BDIA's gamma, a float or
    "obelm" (per-step O-BELM gamma, `restore.engine.exact_inversion.obelm_gammas`). The default matters once data
    consistency perturbs the regeneration: where the denoiser is locally constant (high noise, or a memorising
    prior) BDIA's perturbations follow the roots sigma_{i+1}/sigma_i (physical) and -gamma r (parasitic) on a grid
    of ratio r = sigma_i/sigma_{i+1}, so a constant gamma near 1 amplifies them by up to r per step on a Karras
    grid, while O-BELM's gamma_i ~ 1/r^2 damps them (tests/test_exact_inversion.py; this refines
    docs/methods.md#bdia, which neglects the denoiser's Jacobian); ``p`` EDICT mixing; ``dc`` in step|end|none.
    ``callback`` is passed to every phase (inversion, regeneration, final step); ``i`` restarts in each.
    """
    if dc not in DC_MODES:
        raise ValueError(f"dc must be one of {', '.join(DC_MODES)}, got {dc!r}")
    if not 0 < sigma_in < sigma_s:
        raise ValueError(f"need 0 < sigma_in < sigma_s, got {sigma_in}, {sigma_s}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    steps = inversion_steps(method, nfe)
    x = op.pinv(y) if op.linear else y
    if noise > 0:
        x = x + noise * randn(x.shape, generator, device=x.device, dtype=x.dtype)

    def consistent(z: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        return op.project(model(z, sigma, **kwargs), y)

    denoiser = consistent if dc == "step" else model
    kw = {"callback": callback, "extra_args": class_conditioning(model, class_labels, y.shape[0], y.device)}
    if steps > 0:
        down = karras_sigmas(steps + 1, sigma_in, sigma_s, append_zero=False, device=x.device)
        up = down.flip(0)
        if method == "bdia":
            x = bdia_sample(denoiser, bdia_invert(model, x, up, gamma, **kw), down, gamma, **kw)
        elif method == "edict":
            x = edict_sample(denoiser, edict_invert(model, x, up, p, **kw), down, p, **kw)
        else:
            x = ddim_sample(denoiser, ddim_invert(model, x, up, **kw), down, **kw)
    x_hat = ddim_sample(denoiser, x, (sigma_in, 0.0), **kw).clamp(-1, 1)  # DDIM step to 0 = D(x; sigma_in)
    return x_hat if dc == "none" else op.project(x_hat, y)
