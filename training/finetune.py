"""Bidirectional consistency fine-tuning (BCF) initialisation from a pretrained consistency model.

Li & He 2024, docs/methods.md#bcf-fine-tuning (official ``BCM/scripts/cm_train.py``): load the CM weights into a UNet
with the u pathway, copy ``time_embed`` into ``time_embed_end`` and set the bias-free ``time_embed_align`` to
[I | 0], so the new network ignores u and, at u = σ_min, reproduces the CM up to the boundary-scaling change
c_skip: σ_d²/((t−σ_min)² + σ_d²) (CM) → (t·σ_min + σ_d²)/(t² + σ_d²) (BCM); c_out is identical.
"""

from __future__ import annotations

import dataclasses

import torch

from restore.engine.networks.unet import UNet
from restore.engine.wrappers import BCM

__all__ = ["bcm_from_cm"]

_U_PATH = ("time_embed_end.", "time_embed_align.")


def bcm_from_cm(cm) -> BCM:
    """A :class:`restore.engine.wrappers.BCM` whose network is ``cm.net`` plus an identity-initialised u pathway.

    ``cm``: a ``ConsistencyModel`` (or any wrapper whose ``.net`` is a non-bidirectional UNet). The result is on
    the same device/dtype; ``cm`` is left unchanged."""
    config = cm.net.config
    if config.bidirectional:
        raise ValueError("the network is already bidirectional")
    net = UNet(dataclasses.replace(config, bidirectional=True))
    ref = next(cm.net.parameters())
    net.to(device=ref.device, dtype=ref.dtype)
    missing, unexpected = net.load_state_dict(cm.net.state_dict(), strict=False)
    if unexpected or any(not k.startswith(_U_PATH) for k in missing):
        raise ValueError(f"checkpoint does not match the bidirectional UNet: missing {missing}, "
                         f"unexpected {unexpected}")
    with torch.no_grad():
        net.time_embed_end.load_state_dict(net.time_embed.state_dict())
        dim = net.time_embed_align.weight.shape[0]
        align = torch.zeros_like(net.time_embed_align.weight)
        align[:, :dim] = torch.eye(dim, dtype=align.dtype, device=align.device)
        net.time_embed_align.weight.copy_(align)
    return BCM(net, sigma_data=cm.sigma_data, sigma_min=cm.sigma_min, sigma_max=cm.sigma_max)
