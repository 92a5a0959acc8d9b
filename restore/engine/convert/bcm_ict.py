"""``bcm-ict``: Mosasaur5526/BCM-iCT-torch (Li & He 2024, "Bidirectional Consistency Models").

``torch.save`` of a flat, un-prefixed fp32 ``state_dict`` of the ADM ``UNetModel``
(docs/models.md#upstream-checkpoints), e.g. ``bcf_imagenet64_no32_qkv_4096/ema_0.99997_234000.pt`` (BCM) or the iCT
ones. The architecture is read off the keys and shapes; BCM checkpoints (with ``time_embed_end.*``) become a "bcm"
wrapper, iCT ones a "cm" wrapper. Loaded with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from restore.engine.checkpoints import load_state_dict_file
from restore.engine.convert import register_converter
from restore.engine.networks import UNet, UNetConfig
from restore.engine.wrappers import get_wrapper

# Noise-level constants of the official models (docs/methods.md#bcm-parametrisation).
_BCM_ICT_SIGMAS = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}


def _block_indices(sd: dict[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def infer_bcm_ict_config(sd: dict[str, torch.Tensor], *, img_resolution: int = 64, num_head_channels: int = 64,
                         dropout: float = 0.0, dropout_lowres: float | None = 0.2) -> UNetConfig:
    """The `UNetConfig` of an official BCM/iCT state dict, read from its keys and shapes.

    Not recoverable from the weights, hence arguments: image resolution, head width, dropout rates
    (defaults: the official ImageNet-64 values, docs/models.md#network).
    Levels L = 1 + number of output blocks holding an upsampler; the ``L (nrb + 1)`` input blocks give
    num_res_blocks (docs/models.md#network: 1 + L nrb + (L - 1) input blocks); widths from each level's first ResBlock.
    """
    try:
        stem = sd["input_blocks.0.0.weight"]
        out_conv = sd["out.2.weight"]
    except KeyError as e:
        raise ValueError(f"not an ADM UNet state dict: missing {e.args[0]!r}") from None
    mc = stem.shape[0]
    n_in = len(_block_indices(sd, "input_blocks"))
    # An output block ends with an upsampler iff it has a ResBlock (or conv Upsample) after position 0.
    ups = [j for j in _block_indices(sd, "output_blocks")
           if any(re.match(rf"^output_blocks\.{j}\.[1-9]\d*\.(in_layers|conv)\.", k) for k in sd)]
    levels = len(ups) + 1
    if n_in % levels:
        raise ValueError(f"{n_in} input blocks do not fit {levels} levels")
    nrb = n_in // levels - 1
    mult, attn = [], []
    for level in range(levels):
        first = 1 + level * (nrb + 1)
        width = sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]
        mult.append(width // mc)
        if f"input_blocks.{first}.1.qkv.weight" in sd:
            attn.append(img_resolution >> level)
    return UNetConfig(
        img_resolution=img_resolution, model_channels=mc, channel_mult=tuple(mult), num_res_blocks=nrb,
        attention_resolutions=tuple(attn), in_channels=stem.shape[1], out_channels=out_conv.shape[0],
        num_head_channels=num_head_channels, dropout=dropout, dropout_lowres=dropout_lowres,
        num_classes=sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else 0,
        bidirectional="time_embed_end.0.weight" in sd,
        resblock_updown=f"input_blocks.{nrb + 1}.0.op.weight" not in sd,
    )


def read_bcm_ict(src: str | Path, *, wrapper: str | None = None, img_resolution: int = 64,
                 num_head_channels: int = 64) -> nn.Module:
    """The wrapped model of an official BCM/iCT state dict ``src``.

    ``wrapper`` defaults to "bcm" for bidirectional networks and "cm" otherwise. The state dict is
    loaded into the inferred UNet with ``strict=True``, so any key or shape mismatch is an error.
    """
    sd = load_state_dict_file(src)
    config = infer_bcm_ict_config(sd, img_resolution=img_resolution, num_head_channels=num_head_channels)
    with torch.device("meta"):
        net = UNet(config)
    try:
        net.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{src} does not match the inferred architecture {config}: {e}") from None
    name = wrapper or ("bcm" if config.bidirectional else "cm")
    return get_wrapper(name)(net, **_BCM_ICT_SIGMAS)


register_converter("bcm-ict", read_bcm_ict, "Mosasaur5526/BCM-iCT-torch state dicts (BCM, iCT; ImageNet-64)")
