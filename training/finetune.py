"""Initialise a BCM from a pretrained one-directional model: a consistency model (BCF fine-tuning) or an EDM denoiser
(the teacher of bidirectional consistency distillation).

Both load the pretrained weights into a UNet with the u pathway and make that pathway contribute nothing
(:func:`identity_u_path`, Li & He 2024, official ``BCM/scripts/cm_train.py``; docs/methods.md#bcf-fine-tuning): copy
``time_embed`` into ``time_embed_end`` and set the bias-free ``time_embed_align`` to [I | 0], so the new network
F(x, t, u) = F_pretrained(x, t) for every u. Only the wrapper's scalings change:

- from a CM (:func:`bcm_from_cm`): at u = σ_min the BCM reproduces the CM up to the boundary-scaling change
  c_skip: σ_d²/((t−σ_min)² + σ_d²) (CM) → (t·σ_min + σ_d²)/(t² + σ_d²) (BCM); c_out is identical.
- from an EDM denoiser D (:func:`bcm_from_edm`, docs/methods.md#bidirectional-consistency-distillation): the BCM
  scalings are c_skip^BCM = u/t + (1 − u/t)·c_skip^EDM and c_out^BCM = (1 − u/t)·c_out^EDM, so with the same F
  f(x, t, u) = (u/t)·x + (1 − u/t)·D(x; t) = x + (u − t)·(x − D(x; t))/t for every u (exactly, up to rounding): the
  student starts as one Euler (DDIM) step of the teacher's PF ODE from t to u, in both directions. Its one-step x0
  prediction is f(x, t, σ_min) = D(x; t) + (σ_min/t)·(x − D(x; t)) = D(x; t) + σ_min·ε̂(x; t).
"""

from __future__ import annotations

import dataclasses

import torch

from restore.engine.networks.unet import UNet
from restore.engine.wrappers import BCM, ConsistencyModel, EDMDenoiser

__all__ = ["identity_u_path", "bcm_from_cm", "bcm_from_edm"]

_U_PATH = ("time_embed_end.", "time_embed_align.")


def identity_u_path(net: UNet) -> UNet:
    """A bidirectional UNet with ``net``'s weights whose u pathway contributes nothing: ``time_embed_end`` =
    ``time_embed``, ``time_embed_align`` = [I | 0] (bias-free), so its output ignores ``noise_u`` and equals
    ``net``'s. ``net`` (non-bidirectional) is left unchanged; the copy has its device and dtype."""
    config = net.config
    if config.bidirectional:
        raise ValueError("the network is already bidirectional")
    out = UNet(dataclasses.replace(config, bidirectional=True))
    ref = next(net.parameters())
    out.to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = out.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not k.startswith(_U_PATH) for k in missing):
        raise ValueError(f"checkpoint does not match the bidirectional UNet: missing {missing}, "
                         f"unexpected {unexpected}")
    with torch.no_grad():
        out.time_embed_end.load_state_dict(out.time_embed.state_dict())
        dim = out.time_embed_align.weight.shape[0]
        align = torch.zeros_like(out.time_embed_align.weight)
        align[:, :dim] = torch.eye(dim, dtype=align.dtype, device=align.device)
        out.time_embed_align.weight.copy_(align)
    return out


def _bcm_from(model) -> BCM:
    return BCM(identity_u_path(model.net), sigma_data=model.sigma_data, sigma_min=model.sigma_min,
               sigma_max=model.sigma_max)


def bcm_from_cm(cm: ConsistencyModel) -> BCM:
    """BCF: a :class:`restore.engine.wrappers.BCM` whose network is ``cm.net`` plus an identity-initialised u pathway.

    ``cm``: a ``ConsistencyModel`` (or any wrapper whose ``.net`` is a non-bidirectional UNet). The result is on
    the same device/dtype; ``cm`` is left unchanged."""
    return _bcm_from(cm)


def bcm_from_edm(teacher: EDMDenoiser) -> BCM:
    """BCD initialisation: a BCM whose network is the EDM ``teacher``'s plus an identity-initialised u pathway, so
    that f(x, t, u) = x + (u − t)(x − D(x; t))/t (one Euler step of the teacher's PF ODE; module docstring). The
    constants σ_min, σ_max, σ_d are the teacher's; ``teacher`` is left unchanged."""
    if type(teacher) is not EDMDenoiser:
        raise ValueError(f"the teacher must be an EDM denoiser (wrapper 'edm'), got {type(teacher).__name__}")
    return _bcm_from(teacher)
