"""``openai-cm``: openai/consistency_models (Song et al. 2023, "Consistency Models"), PyTorch release.

Files: ``cd_imagenet64_l2.pt``, ``cd_imagenet64_lpips.pt``, ``ct_imagenet64.pt`` and their teacher
``edm_imagenet64_ema.pt`` (class-conditional ImageNet-64); ``{cd,ct,edm}_{bedroom,cat}256*.pt`` (LSUN-256,
unconditional). Each is ``torch.save`` of a flat, un-prefixed fp32 ``state_dict`` of the ADM ``UNetModel`` (the
guided-diffusion fork), read with ``torch.load(weights_only=True)``. Same module tree as BCM/iCT but plain attention
(no QKV normalisation: a property of the source, not of the weights), 2-D attention convs, qkv rows already in this
package's (three, heads, head_dim) order, scale-shift norm on ImageNet-64 (read off ``emb_layers.1``).

Wrapper (not in the weights): ``edm_*`` files are EDM denoisers (Karras scalings, "edm"); ``cd_*`` / ``ct_*`` are
consistency models (boundary-condition scalings, "cm"); ``wrapper=`` overrides. Both use the label 250 ln sigma,
sigma in [0.002, 80], sigma_data 0.5 (official ``KarrasDenoiser``). docs/models.md#upstream-checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from restore.engine.checkpoints import load_state_dict_file
from restore.engine.convert import register_converter
from restore.engine.convert.adm import default_resolution, infer_adm_config, load_adm, to_native_layout
from restore.engine.wrappers import get_wrapper

CM_SIGMAS = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}
CM_WRAPPERS = ("cm", "edm")


def default_cm_wrapper(name: str) -> str:
    """"edm" for the EDM teachers (``edm_*``), "cm" for the distilled / trained consistency models (``cd_*``,
    ``ct_*``) and any other name."""
    return "edm" if Path(name).name.startswith("edm_") else "cm"


def read_openai_cm(src: str | Path, *, wrapper: str | None = None, img_resolution: int | None = None,
                   num_head_channels: int = 64) -> nn.Module:
    """The wrapped model of an openai/consistency_models checkpoint ``src`` (strict key match).

    ``wrapper``: "cm" or "edm" (default by file name, `default_cm_wrapper`). ``img_resolution``: default the size in
    the file name (``imagenet64`` -> 64, ``bedroom256`` -> 256), else 8 * 2^(levels - 1). ``num_head_channels``: 64 in
    every released config (``--num_head_channels 64``).
    """
    name = wrapper or default_cm_wrapper(str(src))
    if name not in CM_WRAPPERS:
        raise ValueError(f"openai-cm checkpoints are wrapped as {' or '.join(CM_WRAPPERS)}, not {name!r}")
    sd = load_state_dict_file(src)
    sd = to_native_layout(sd, num_head_channels=num_head_channels)  # Conv2d attention, (three, h, d) rows: no-op
    config = infer_adm_config(sd, img_resolution=img_resolution or default_resolution(sd, str(src)),
                              num_head_channels=num_head_channels, qkv_norm=False)
    return get_wrapper(name)(load_adm(sd, config, src), **CM_SIGMAS)


register_converter("openai-cm", read_openai_cm,
                   "openai/consistency_models (cd_*/ct_* consistency models, edm_* teachers; ImageNet-64, LSUN-256)")
