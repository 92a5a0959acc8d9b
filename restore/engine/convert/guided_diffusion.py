"""``guided-diffusion``: openai/guided-diffusion ADM checkpoints (Dhariwal & Nichol 2021) and DPS's FFHQ model.

Files: ``256x256_diffusion_uncond.pt``, ``256x256_diffusion.pt`` (class-conditional), ``64x64_diffusion.pt``
(class-conditional, cosine schedule), DPS's ``ffhq_10m.pt`` (and ``imagenet256.pt``). Each is ``torch.save`` of a
flat, un-prefixed fp32 ``state_dict`` of ``UNetModel``, read with ``torch.load(weights_only=True)``.

Layout changes (`restore.engine.convert.adm.to_native_layout`): Conv1d attention weights [3C, C, 1] -> [3C, C, 1, 1];
qkv rows from the legacy (heads, three, head_dim) order (``use_new_attention_order=False``: 256 px and FFHQ) or kept
((three, heads, head_dim), ``64x64_diffusion.pt``); the learned-variance head (6 output channels, epsilon then the
variance interpolation v) keeps only its first 3 rows. Deviation: v, which guided-diffusion's / DPS's own
ancestral samplers use for the learned-range variance, is dropped; the toolkit's sigma-samplers need only epsilon.

Not in the weights, hence options with defaults: ``schedule`` (cosine for a 64 px network, else linear, as released),
``qkv_order`` (64 px: the new order, else legacy), the resolution (file name, else 8 * 2^(levels - 1)), 64 channels
per head (``--num_head_channels 64`` in every release, DPS FFHQ included). The network is wrapped as a
`restore.engine.wrappers.VPEpsDenoiser`: D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from restore.engine.checkpoints import load_state_dict_file
from restore.engine.convert import register_converter
from restore.engine.convert.adm import default_resolution, infer_adm_config, load_adm, to_native_layout
from restore.engine.convert.layout import QKV_ORDERS
from restore.engine.wrappers import VP_SCHEDULES, VPEpsDenoiser

EPS_CHANNELS = 3


def default_schedule(img_resolution: int) -> str:
    """Released noise schedules: cosine for ``64x64_diffusion.pt``, linear for the 256 px ImageNet / FFHQ models."""
    return "cosine" if img_resolution == 64 else "linear"


def default_qkv_order(img_resolution: int) -> str:
    """``64x64_diffusion.pt`` was trained with ``use_new_attention_order=True``; the 256 px models (and DPS FFHQ)
    with the legacy order."""
    return "three-heads-dim" if img_resolution == 64 else "heads-three-dim"


def read_guided_diffusion(src: str | Path, *, img_resolution: int | None = None, num_head_channels: int = 64,
                          schedule: str | None = None, qkv_order: str | None = None,
                          wrapper: str | None = None) -> nn.Module:
    """The `VPEpsDenoiser` of a guided-diffusion / DPS state dict ``src`` (strict key match after the layout
    changes). Defaults by resolution: `default_schedule`, `default_qkv_order`."""
    if wrapper not in (None, VPEpsDenoiser.kind):
        raise ValueError(f"guided-diffusion checkpoints are wrapped as {VPEpsDenoiser.kind!r}, not {wrapper!r}")
    if schedule is not None and schedule not in VP_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(VP_SCHEDULES)}")
    if qkv_order is not None and qkv_order not in QKV_ORDERS:
        raise ValueError(f"unknown qkv order {qkv_order!r}; known: {', '.join(QKV_ORDERS)}")
    sd = load_state_dict_file(src)
    resolution = img_resolution or default_resolution(sd, str(src))
    sd = to_native_layout(sd, qkv_order=qkv_order or default_qkv_order(resolution),
                          num_head_channels=num_head_channels, out_channels=EPS_CHANNELS)
    config = infer_adm_config(sd, img_resolution=resolution, num_head_channels=num_head_channels, qkv_norm=False)
    net = load_adm(sd, config, src)
    return VPEpsDenoiser(net, schedule=schedule or default_schedule(resolution))


register_converter("guided-diffusion", read_guided_diffusion,
                   "openai/guided-diffusion ADM (256x256 uncond/cond, 64x64) and DPS ffhq_10m.pt; VP-epsilon")
