"""What every ADM-family converter shares (docs/models.md#upstream-checkpoints): the architecture read off an ADM
``UNetModel`` state dict, the official-to-native layout changes, and strict loading into this package's `UNet`.

Read off the weights (`infer_adm_config`): base width, channel multipliers, blocks per level, attention levels,
classes, input/output channels, BCM's second time embedding, residual up/down-sampling, scale-shift norm. Not in
the weights, hence arguments with per-family defaults: image resolution, head width, QKV normalisation, the qkv row
order, dropout rates (irrelevant at inference).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from restore.engine.convert.layout import qkv_rows_to_native
from restore.engine.networks import UNet, UNetConfig

COARSEST = 8  # every released ADM-family network ends at an 8x8 level (64 px: 4 levels, 256 px: 6 levels)


def block_indices(sd: dict[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def adm_levels(sd: dict[str, torch.Tensor]) -> int:
    """Number of resolution levels: 1 + the output blocks holding an upsampler (a ResBlock or conv ``Upsample`` after
    position 0)."""
    ups = [j for j in block_indices(sd, "output_blocks")
           if any(re.match(rf"^output_blocks\.{j}\.[1-9]\d*\.(in_layers|conv)\.", k) for k in sd)]
    return len(ups) + 1


def resolution_from_name(name: str) -> int | None:
    """The image size a released file's name states (``64x64_diffusion.pt``, ``cd_imagenet64_l2.pt``,
    ``ct_bedroom256.pt``): a 32/64/128/256/512 not part of a longer number; None if absent."""
    m = re.search(r"(?<!\d)(32|64|128|256|512)(?!\d)", Path(name).name)
    return int(m.group(1)) if m else None


def default_resolution(sd: dict[str, torch.Tensor], name: str) -> int:
    """Resolution from the file name, else from the layout (coarsest level 8x8: 8 * 2^(levels - 1))."""
    return resolution_from_name(name) or COARSEST << (adm_levels(sd) - 1)


def infer_adm_config(sd: dict[str, torch.Tensor], *, img_resolution: int, num_head_channels: int = 64,
                     qkv_norm: bool = True, dropout: float = 0.0, dropout_lowres: float | None = None) -> UNetConfig:
    """The `UNetConfig` of a native-layout ADM state dict (attention convs 2-D, qkv rows in this package's order).

    Levels L from the upsamplers; the ``L (nrb + 1)`` input blocks after the stem give num_res_blocks
    (docs/models.md#network); widths from each level's first ResBlock; attention where that block has ``qkv``;
    scale-shift norm where ``emb_layers.1`` has twice the block's width; class conditioning from ``label_emb``;
    ``cond_channels`` stays 0 (extra input channels count as ``in_channels``: converters split them).
    """
    try:
        stem = sd["input_blocks.0.0.weight"]
        out_conv = sd["out.2.weight"]
    except KeyError as e:
        raise ValueError(f"not an ADM UNet state dict: missing {e.args[0]!r}") from None
    mc = stem.shape[0]
    n_in = len(block_indices(sd, "input_blocks"))
    levels = adm_levels(sd)
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
    emb_rows = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    block_width = sd["input_blocks.1.0.out_layers.3.weight"].shape[0]
    return UNetConfig(
        img_resolution=img_resolution, model_channels=mc, channel_mult=tuple(mult), num_res_blocks=nrb,
        attention_resolutions=tuple(attn), in_channels=stem.shape[1], out_channels=out_conv.shape[0],
        num_head_channels=num_head_channels, dropout=dropout, dropout_lowres=dropout_lowres,
        num_classes=sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else 0,
        bidirectional="time_embed_end.0.weight" in sd,
        resblock_updown=f"input_blocks.{nrb + 1}.0.op.weight" not in sd,
        qkv_norm=qkv_norm, scale_shift_norm=emb_rows == 2 * block_width,
    )


def to_native_layout(sd: dict[str, torch.Tensor], *, qkv_order: str = "three-heads-dim", num_head_channels: int = 64,
                     out_channels: int | None = None) -> dict[str, torch.Tensor]:
    """A copy of an official ADM state dict in this package's layout.

    Conv1d attention weights (``qkv``, ``proj_out``: [out, in, 1], guided-diffusion / I2SB) become 1x1 Conv2d
    weights [out, in, 1, 1]; ``qkv`` rows are permuted from ``qkv_order`` to (three, heads, head_dim)
    (`qkv_rows_to_native`, heads = width / ``num_head_channels``); ``out_channels`` keeps only the first rows of the
    output conv ``out.2`` (the epsilon half of a learned-variance head).
    """
    native = {}
    for key, t in sd.items():
        if key.endswith((".qkv.weight", ".proj_out.weight")) and t.ndim == 3:
            t = t[..., None]
        if key.endswith((".qkv.weight", ".qkv.bias")) and qkv_order != "three-heads-dim":
            width = t.shape[0] // 3
            if width % num_head_channels:
                raise ValueError(f"{key}: width {width} is not a multiple of {num_head_channels} head channels")
            t = qkv_rows_to_native(t, width // num_head_channels, qkv_order)
        if key in ("out.2.weight", "out.2.bias") and out_channels is not None:
            if t.shape[0] < out_channels:
                raise ValueError(f"{key} has {t.shape[0]} output rows, fewer than {out_channels}")
            t = t[:out_channels]
        native[key] = t
    return native


def load_adm(sd: dict[str, torch.Tensor], config: UNetConfig, src: str | Path) -> UNet:
    """`UNet(config)` holding ``sd`` (strict: any key or shape mismatch is a ValueError naming ``src``)."""
    with torch.device("meta"):
        net = UNet(config)
    try:
        net.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{src} does not match the inferred architecture {config}: "
                         f"{' '.join(str(e).split())[:500]}") from None
    return net.eval()
