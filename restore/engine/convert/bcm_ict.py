"""``bcm-ict``: Mosasaur5526/BCM-iCT-torch (Li & He 2024, "Bidirectional Consistency Models").

``torch.save`` of a flat, un-prefixed fp32 ``state_dict`` of the ADM ``UNetModel``
(docs/models.md#upstream-checkpoints), e.g. ``bcf_imagenet64_no32_qkv_4096/ema_0.99997_234000.pt`` (BCM) or the iCT
ones. The architecture is read off the keys and shapes; BCM checkpoints (with ``time_embed_end.*``) become a "bcm"
wrapper, iCT ones a "cm" wrapper. Loaded with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from restore.engine.checkpoints import load_state_dict_file
from restore.engine.convert import register_converter
from restore.engine.convert.adm import infer_adm_config, load_adm
from restore.engine.networks import UNetConfig
from restore.engine.wrappers import get_wrapper

# Noise-level constants of the official models (docs/methods.md#bcm-parametrisation).
_BCM_ICT_SIGMAS = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}


def infer_bcm_ict_config(sd: dict[str, torch.Tensor], *, img_resolution: int = 64, num_head_channels: int = 64,
                         dropout: float = 0.0, dropout_lowres: float | None = 0.2) -> UNetConfig:
    """The `UNetConfig` of an official BCM/iCT state dict, read from its keys and shapes (`infer_adm_config`).

    Not recoverable from the weights, hence arguments: image resolution, head width, dropout rates
    (defaults: the official ImageNet-64 values, docs/models.md#network); BCM/iCT attention is QKV-normalised.
    """
    return infer_adm_config(sd, img_resolution=img_resolution, num_head_channels=num_head_channels, qkv_norm=True,
                            dropout=dropout, dropout_lowres=dropout_lowres)


def read_bcm_ict(src: str | Path, *, wrapper: str | None = None, img_resolution: int = 64,
                 num_head_channels: int = 64) -> nn.Module:
    """The wrapped model of an official BCM/iCT state dict ``src``.

    ``wrapper`` defaults to "bcm" for bidirectional networks and "cm" otherwise. The state dict is
    loaded into the inferred UNet with ``strict=True``, so any key or shape mismatch is an error.
    """
    sd = load_state_dict_file(src)
    config = infer_bcm_ict_config(sd, img_resolution=img_resolution, num_head_channels=num_head_channels)
    net = load_adm(sd, config, src)
    name = wrapper or ("bcm" if config.bidirectional else "cm")
    return get_wrapper(name)(net, **_BCM_ICT_SIGMAS)


register_converter("bcm-ict", read_bcm_ict, "Mosasaur5526/BCM-iCT-torch state dicts (BCM, iCT; ImageNet-64)")
