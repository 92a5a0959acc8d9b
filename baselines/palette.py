"""Palette: image-to-image diffusion models (Saharia, Chan, Chang, Lee, Ho, Salimans, Fleet, Norouzi; SIGGRAPH 2022).

A supervised conditional denoiser, one model per degradation (docs/methods.md#palette): the network sees the noisy image
concatenated with the degraded image at full size, [x_sigma ; c(y)] (6 input channels for RGB, UNet
``cond_channels = 3``), and is trained on (clean, degraded) pairs; sampling is ancestral DDPM from pure noise,
conditioned on c(y) at every step.

Here, on the project's backbone and conventions:

* The model is a :class:`Palette` wrapper = an EDM-preconditioned denoiser D(x; sigma, cond=c(y)) (Karras et al.
  2022, Eq. 7 / Table 1) trained with the EDM loss (Eq. 8, ``training.losses.EDMLoss``) on pairs made on the fly by
  the operator (``training.paired.PaletteLoss``). The wrapper stores the operator spec it was trained for
  (checkpoint ``wrapper_config``); :func:`restore_palette` refuses any other operator.
* Condition c(y) = :func:`degraded_image`: the measurement as a full-size image, ``op.pinv(y)`` -- the decoded image
  for JPEG, the zero-filled image for box / randbox, the minimum-norm upsampling A^+ y for ``down`` -- with the
  hole of masking operators filled with N(0, I) noise (Janspiry's Palette code, ``cond_image = img * (1 - mask) +
  mask * randn``; the same fill I2SB uses).
* Sampler: the DDPM ancestral step (DDIM with eta = 1, Song et al. 2021 Eq. 16; ``baselines.common``) on ``nfe``
  Karras levels from sigma_max to sigma_min and a last step to 0, so NFE = ``nfe`` for any ``nfe``; ``eta = 0``
  gives the deterministic DDIM / Euler step of the probability-flow ODE (Karras et al. 2022, Algorithm 1 without
  the correction).

Deviations from the paper:

* EDM (variance-exploding) noise levels, preconditioning, lognormal sigma sampling and loss weighting instead of
  the DDPM noise-prediction loss with WaveGrad's continuous gamma ~ U(abar_{t-1}, abar_t) conditioning; the
  network's noise input is the project's 250 ln sigma.
* Karras sampling levels with any number of steps instead of a fixed 1000-step DDPM schedule.
* Super-resolution condition: A^+ y of the operator's kernel instead of bicubic upsampling (identical pipeline for
  every operator; A^+ y is consistent: A A^+ y = y).
* Inpainting: no loss mask and no pasting of known pixels during sampling (both only in the unofficial code); the
  network sees the observed pixels in its condition.
"""

from __future__ import annotations

import torch

from baselines.common import ddim_noise, renoise, sampling_levels, step_callback
from operators import build_operator
from operators.utils import Generator, randn
from restore.engine.wrappers import EDMDenoiser, check_operator, class_conditioning, register_wrapper
from restore.methods import Float, register_method

PALETTE_OPERATORS = ("jpeg", "box", "randbox", "down")


def degraded_image(op, y: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """The measurement ``y`` as a clean-sized image: ``op.pinv(y)`` (JPEG: the decoded image itself), with the hole
    of masking operators (``op.mask_for``, True = observed) filled with N(0, I) noise drawn from ``generator``."""
    image = op.pinv(y)
    if not hasattr(op, "mask_for"):
        return image
    noise = randn(image.shape, generator, device=image.device, dtype=image.dtype)
    return torch.where(op.mask_for(image), image, noise)


class Palette(EDMDenoiser):
    """Conditional EDM denoiser D(x; sigma, cond=c(y)) for one degradation: ``model(x, sigma, cond=c) -> x0_hat``.

    ``operator``: the spec of the degradation it is trained for (canonicalised; saved with the checkpoint).
    The network must have ``cond_channels`` equal to its image channels.
    """

    kind = "palette"

    def __init__(self, net, *, operator: str, **kwargs):
        super().__init__(net, **kwargs)
        cfg = getattr(net, "config", None)
        if cfg is not None and cfg.cond_channels != cfg.in_channels:
            raise ValueError(f"a Palette network needs cond_channels = in_channels = {cfg.in_channels} "
                             f"(the degraded image), got cond_channels = {cfg.cond_channels}")
        self.operator = build_operator(operator).spec

    def wrapper_config(self) -> dict:
        return {**super().wrapper_config(), "operator": self.operator}

    def extra_repr(self) -> str:
        return f"operator={self.operator!r}, {super().extra_repr()}"


register_wrapper(Palette.kind, Palette)


def palette_sample(model, cond: torch.Tensor, nfe: int, *, eta: float = 1.0, generator: Generator = None,
                   callback=None, extra_args: dict | None = None) -> torch.Tensor:
    """Ancestral (eta = 1) or DDIM / Euler (eta = 0) sampling of D(x; sigma, cond) from x = sigma_max z down to
    sigma = 0 on ``nfe`` Karras levels: exactly ``nfe`` network evaluations. ``extra_args``: further keyword
    arguments of every model call (class labels)."""
    sigmas = sampling_levels(model, nfe)
    dtype = torch.promote_types(cond.dtype, torch.float32)
    x = sigmas[0] * randn(cond.shape, generator, device=cond.device, dtype=dtype)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = model(x, sigma, cond=cond, **(extra_args or {}))
        step_callback(callback, x, i, sigma, sigma_next, x0)
        x = renoise(x0, (x - x0) / sigma, sigma_next, ddim_noise(sigma, sigma_next, eta), generator)
    return x


@register_method("palette", blind=False, model="palette", operators=PALETTE_OPERATORS, default_nfe=1000,
                 space={"eta": Float(0.0, 1.0)})
def restore_palette(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None, callback=None,
                    class_labels=None, eta: float = 1.0) -> torch.Tensor:
    """Palette (Saharia et al. 2022): conditional diffusion trained for this operator, DDPM ancestral sampling.

    ``eta``: 1 = ancestral DDPM steps (the paper), 0 = deterministic DDIM / Euler steps. NFE = ``nfe``.
    Not blind: the condition is ``op.pinv(y)`` (and ``op.mask_for`` for inpainting); ``op`` must be the trained one.
    """
    check_operator(model, op)
    labels = class_conditioning(model, class_labels, y.shape[0], y.device)
    return palette_sample(model, degraded_image(op, y, generator), nfe, eta=eta, generator=generator,
                          callback=callback, extra_args=labels)
