"""ADM UNet backbone with BCM's two-time conditioning.

Architecture: Dhariwal & Nichol 2021 (ADM) as modified for consistency models by Li & He 2024,
"Bidirectional Consistency Models" (arXiv 2403.18035; official `BCM/cm/unet_bcf.py`): no scale-shift
norm, residual up/down-sampling, QKV-normalised attention, extra low-resolution dropout, and for the
bidirectional network a second time embedding for the target noise level u (spec: docs/models.md#network).
Parameter names match the official checkpoints (docs/models.md#upstream-checkpoints), so they load with ``strict=True``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from restore.engine.networks.config import NetworkConfig
from restore.engine.networks.layers import (
    AttentionBlock,
    Downsample,
    EmbedSequential,
    GroupNorm32,
    ResBlock,
    SyncDropout,
    Upsample,
    replay_dropout,
    timestep_embedding,
    zero_module,
)

LOWRES_MAX = 16  # official "dropout_highres" applies at 16x16, 8x8 and the middle block (docs/models.md#network)


@dataclass(frozen=True, kw_only=True)
class UNetConfig(NetworkConfig):
    """Architecture of a `UNet`; stored verbatim in checkpoints (`to_dict` / `from_dict`).

    ``attention_resolutions`` are feature-map sizes (e.g. (16, 8)), not ADM's downsampling factors.
    ``dropout`` applies at levels above 16x16; ``dropout_lowres`` (the official ``dropout_highres``)
    at levels of resolution <= 16 and in the middle block (None: same as ``dropout``).
    ``cond_channels`` extra input channels are concatenated to x (conditional baselines).
    ``bidirectional`` adds the u embedding (``time_embed_end`` + bias-free ``time_embed_align``).
    ``qkv_norm`` (BCM's QKV normalisation) and ``scale_shift_norm`` (ADM's ``use_scale_shift_norm``) are the
    switches other ADM-family checkpoints differ in (docs/models.md#upstream-checkpoints).
    """

    img_resolution: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    in_channels: int = 3
    out_channels: int = 3
    cond_channels: int = 0
    num_head_channels: int = 64
    dropout: float = 0.0
    dropout_lowres: float | None = None
    num_classes: int = 0
    bidirectional: bool = False
    resblock_updown: bool = True
    qkv_norm: bool = True
    scale_shift_norm: bool = False
    family = "UNet"  # not a field: the name in NetworkConfig's messages

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        levels = len(self.channel_mult)
        if levels < 1 or self.num_res_blocks < 1:
            raise ValueError("channel_mult and num_res_blocks must be non-empty / positive")
        if self.img_resolution % 2 ** (levels - 1):
            raise ValueError(f"img_resolution {self.img_resolution} not divisible by 2^{levels - 1}")
        widths = [self.model_channels * m for m in self.channel_mult]
        if any(w % 32 for w in widths):
            raise ValueError(f"channel widths {widths} must be multiples of 32 (GroupNorm with 32 groups)")
        resolutions = self.level_resolutions
        unknown = sorted(set(self.attention_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(f"attention_resolutions {unknown} are not level resolutions {resolutions}")
        for level, width in enumerate(widths):
            attends = resolutions[level] in self.attention_resolutions or level == levels - 1  # middle block
            if attends and width % self.num_head_channels:
                raise ValueError(f"width {width} at {resolutions[level]}px not divisible by num_head_channels")
        for p in (self.dropout, self.dropout_lowres):
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {p}")
        if min(self.in_channels, self.out_channels) < 1 or min(self.cond_channels, self.num_classes) < 0:
            raise ValueError("in/out channels must be positive, cond_channels and num_classes non-negative")

    @property
    def emb_channels(self) -> int:
        return 4 * self.model_channels

    def level_dropout(self, resolution: int) -> float:
        # The official code selects by level index (input: level > 1, output: level >= L - 2), which is
        # exactly "resolution <= 16" for its 64px / 4-level net; the resolution rule generalises it.
        lowres = self.dropout if self.dropout_lowres is None else self.dropout_lowres
        return lowres if resolution <= LOWRES_MAX else self.dropout


_IMAGENET64 = UNetConfig(
    img_resolution=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
    attention_resolutions=(16, 8), num_head_channels=64, dropout=0.0, dropout_lowres=0.2, num_classes=1000,
)

PRESETS: dict[str, UNetConfig] = {
    # Official BCM ImageNet-64 network (docs/models.md#network): 279,941,571 parameters.
    "imagenet64-bcm": dataclasses.replace(_IMAGENET64, bidirectional=True),
    # The authors' reproduced iCT network: same UNet without the u embedding.
    "imagenet64-ict": _IMAGENET64,
    # Unit tests: < 1M parameters, tens of milliseconds per small-batch forward on CPU.
    "cifar-tiny": UNetConfig(
        img_resolution=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(16,), num_head_channels=32,
    ),
    # CIFAR-10 model for CPU-hour budgets: ~4M parameters, ~3.7 GFLOP per image for forward+backward
    # (narrow 32x32 level, width at 8x8). No dropout: short runs see each image only a few times.
    "cifar-small": UNetConfig(
        img_resolution=32, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2,
        attention_resolutions=(8,), num_head_channels=64,
    ),
}
UNetConfig.presets = PRESETS


class UNet(nn.Module):
    """ADM UNet F(x, noise_t[, noise_u], class_labels, cond) (docs/models.md#network; official ``UNetModel``).

    ``noise_t`` / ``noise_u`` are (B,) (or scalar) noise labels already transformed by the caller
    (the wrappers pass 250 ln sigma). The time embedding is MLP(sinusoid(noise_t)); bidirectional nets
    mix it with MLP'(sinusoid(noise_u)) through the bias-free ``time_embed_align``
    (docs/methods.md#bcm-parametrisation), and class-conditional nets add ``label_emb``. The embedding enters every
    ResBlock (additively, or as scale and shift with ``scale_shift_norm``).
    """

    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        mc, emb_ch = cfg.model_channels, cfg.emb_channels

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.bidirectional:
            self.time_embed_end = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
            self.time_embed_align = nn.Linear(2 * emb_ch, emb_ch, bias=False)
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch)

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.num_head_channels, qkv_norm=cfg.qkv_norm)

        def resblock(*args, **kwargs) -> ResBlock:
            return ResBlock(*args, scale_shift=cfg.scale_shift_norm, **kwargs)

        ch = int(cfg.channel_mult[0] * mc)
        stem = nn.Conv2d(cfg.in_channels + cfg.cond_channels, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList([EmbedSequential(stem)])
        skip_channels = [ch]
        last = len(cfg.channel_mult) - 1
        for level, (mult, res) in enumerate(zip(cfg.channel_mult, cfg.level_resolutions)):
            p = cfg.level_dropout(res)
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, emb_ch, p, int(mult * mc))]
                ch = int(mult * mc)
                if res in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                down = resblock(ch, emb_ch, p, down=True) if cfg.resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)

        p_mid = cfg.level_dropout(0)
        self.middle_block = EmbedSequential(resblock(ch, emb_ch, p_mid), attention(ch), resblock(ch, emb_ch, p_mid))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            mult, res = cfg.channel_mult[level], cfg.level_resolutions[level]
            p = cfg.level_dropout(res)
            for i in range(cfg.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), emb_ch, p, int(mult * mc))]
                ch = int(mult * mc)
                if res in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(resblock(ch, emb_ch, p, up=True) if cfg.resblock_updown else Upsample(ch))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

        self._dropouts = [m for m in self.modules() if isinstance(m, SyncDropout)]
        for index, m in enumerate(self._dropouts):
            m.index = index

    @contextmanager
    def dropout_seed(self, seed: int) -> Iterator[None]:
        """Within the block, every forward pass draws the same dropout masks (per layer, from (seed, layer index)).

        Replaces the official code's re-seeding of the global RNG (docs/methods.md#bct): the online and
        stop-gradient passes of consistency training share masks; the global RNG is not touched.
        """
        with replay_dropout(self._dropouts, seed):
            yield

    def _embed(self, noise: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        noise = torch.as_tensor(noise, device=device).reshape(-1).expand(batch)
        return timestep_embedding(noise, self.config.model_channels)

    def forward(self, x: torch.Tensor, noise_t: torch.Tensor, noise_u: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        cfg, b = self.config, x.shape[0]
        if (noise_u is None) == cfg.bidirectional:
            raise ValueError("noise_u is required by a bidirectional UNet and not accepted otherwise")
        if (class_labels is None) != (cfg.num_classes == 0):
            raise ValueError(f"class_labels required iff num_classes > 0 (num_classes={cfg.num_classes})")
        if (cond is None) != (cfg.cond_channels == 0):
            raise ValueError(f"cond required iff cond_channels > 0 (cond_channels={cfg.cond_channels})")

        # Run in the weights' dtype (fp16/bf16 copies) and hand back the caller's dtype, as ADM does.
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(self._embed(noise_t, b, x.device).to(dtype))
        if cfg.bidirectional:
            emb_u = self.time_embed_end(self._embed(noise_u, b, x.device).to(dtype))
            emb = self.time_embed_align(torch.cat([emb, emb_u], dim=-1))
        if cfg.num_classes:
            emb = emb + self.label_emb(class_labels)

        h = x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1)
        h = h.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["PRESETS", "UNet", "UNetConfig", "count_parameters"]
