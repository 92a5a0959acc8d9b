"""DDNM: denoising diffusion null-space model (Wang, Yu, Zhang; ICLR 2023), noiseless version.

Each step (the paper's Algorithm 1, noiseless; docs/methods.md#ddnm): the range-null-space decomposition of the
denoiser's estimate

    x0_hat <- A^+ y + (I - A^+ A) x0_hat        (= ``op.project(x0_hat, y)``, exact: A x0_hat = y)

followed by the DDIM step of the official code, x_s = x0_hat + sigma_s (eta z + sqrt(1 - eta^2) eps_hat) with the
model's eps_hat = (x_t - D(x_t; sigma_t)) / sigma_t and eta = 0.85 (``configs``), 100 steps by default. The final
step lands on the corrected estimate, so the output satisfies A x = y for noiseless linear operators (box,
randbox, randmask, down with either kernel, blur: DDNM only needs A and A^+, no SVD).

Deviations from the official code: VE-sigma parametrisation (the VP update divided by sqrt(abar_s), exact);
Karras levels, ``nfe`` steps, instead of uniformly spaced integer times; start A^+ y + sigma_max z instead of
pure noise (`baselines.common`); no time travel (l = s = r off) and no DDNM+ (measurement noise is not modelled;
the simplified DDNM+ code also scales the noise by gamma_t = sqrt(1 - abar_s^2), a factor the noiseless step
does not have and which is not reproduced); no JPEG (DDNM has no JPEG operator; DDRM-JPEG, ``ddrm_jpeg``, is the
same idea with J).
"""

from __future__ import annotations

import torch

from baselines.common import initial_state, mix_noise, renoise, sampling_levels, step_callback
from operators.utils import Generator
from restore.engine.wrappers import class_conditioning
from restore.methods import Float, register_method


@register_method("ddnm", blind=False, model="edm", operators=("box", "randbox", "randmask", "down", "blur"),
                 default_nfe=100, space={"eta": Float(0.0, 1.0)})
def restore_ddnm(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None, callback=None,
                 class_labels=None, eta: float = 0.85, sigma_start: float | None = None) -> torch.Tensor:
    """DDNM (Wang et al. 2023): DDIM steps from the range-null-space corrected estimate A^+ y + (I - A^+ A) x0_hat.

    ``eta``: the code's eta (fraction of fresh noise, 0.85); ``sigma_start``: first noise level (default
    sigma_max). NFE = ``nfe``.
    """
    if not op.linear:
        raise ValueError(f"DDNM needs a linear operator with a pseudo-inverse, got {op.spec}")
    cond = class_conditioning(model, class_labels, y.shape[0], y.device)
    sigmas = sampling_levels(model, nfe, sigma_start)
    x = initial_state(op, y, sigmas[0], generator)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = model(x, sigma, **cond)
        step_callback(callback, x, i, sigma, sigma_next, x0)
        x = renoise(op.project(x0, y), (x - x0) / sigma, sigma_next, mix_noise(sigma_next, eta), generator)
    return x
