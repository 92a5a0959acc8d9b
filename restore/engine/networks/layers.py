"""Building blocks of the ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis", openai/guided-diffusion `unet.py`) in the variant used by BCM (Li & He 2024, arXiv
2403.18035; official `BCM/cm/unet_bcf.py`, spec: docs/models.md#network).

Submodule names and `nn.Sequential` positions follow the official code exactly (``in_layers.0``,
``emb_layers.1``, ``out_layers.3``, ``qkv``, ``proj_out``, ...) so official state dicts load strictly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from operators.utils import image_seed


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """ADM sinusoidal embedding of (B,) noise labels: [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half).

    docs/models.md#network (cos first; the caller passes 250 ln sigma). Computed in fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in fp32 whatever the activation/parameter dtype (ADM's GroupNorm32)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer's parameters (ADM: last conv of each residual branch and of the network)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SyncDropout(nn.Module):
    """Dropout whose masks can be replayed: with a seed set, masks come from a private generator.

    BCM/iCT compare two forward passes (online network and stop-gradient target) that must see the
    same dropout masks; the official code re-seeds the global RNG for that (docs/methods.md#bct). Here each
    layer owns an index inside its network; `UNet.dropout_seed(seed)` sets ``seed`` to a value derived
    from (seed, index) and every pass draws its mask from ``torch.Generator().manual_seed(seed)``, so
    the global RNG is never touched. Without a seed it behaves like ``nn.Dropout``.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.index = -1  # position among the network's dropout layers, set by the owner
        self.seed: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.seed is None:
            return F.dropout(x, self.p, training=True)
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        # A contiguous NCHW draw: the mask depends on logical positions only, not on memory format.
        keep = torch.rand(x.shape, generator=gen, device=x.device) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, index={self.index}"


@contextmanager
def replay_dropout(dropouts: list[SyncDropout], seed: int) -> Iterator[None]:
    """Within the block, every forward pass of ``dropouts`` draws the same masks: each layer's seed is derived from
    (``seed``, its index); the previous seeds come back afterwards (the networks' ``dropout_seed``)."""
    previous = [m.seed for m in dropouts]
    for m in dropouts:
        m.seed = image_seed(seed, f"dropout/{m.index}")
    try:
        yield
    finally:
        for m, s in zip(dropouts, previous):
            m.seed = s


class ResBlock(nn.Module):
    """ADM residual block; ``up``/``down`` resample inside the block.

    h = in_layers(x) [GN, SiLU, (resample), conv3x3]; then either h += emb_layers(emb) (BCM/iCT) or, with
    ``scale_shift`` (ADM's ``use_scale_shift_norm``, Dhariwal & Nichol 2021, Sec. 3), emb_layers(emb) gives
    (scale, shift) and h = GN(h) (1 + scale) + shift before the rest of out_layers; h = out_layers(h)
    [GN, SiLU, dropout, zero conv3x3]; returns skip(x) + h, with x resampled like h and skip a
    1x1 conv when the channel count changes (official ``ResBlock._forward``).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 up: bool = False, down: bool = False, scale_shift: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.resample = "up" if up else "down" if down else None
        self.scale_shift = scale_shift
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), SyncDropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        h = conv(self._resample(act(norm(x))))  # ADM resamples between the activation and the conv
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)  # scale first, as in ADM
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(self._resample(x)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over positions with BCM's QKV normalisation (docs/models.md#network).

    qkv is a 1x1 conv whose 3C output channels are ordered [q | k | v] x heads x head_dim ("three"
    outermost, einops ``b (three h d) s``). With ``qkv_norm`` each of q, k and v is rescaled per head
    and position to x / (1e-4 + ||x|| / sqrt(d)) (EDM2-style, official ``normalize``), then
    softmax(q k^T / sqrt(d)) v; heads are concatenated head-major and projected by a zero-init 1x1 conv.
    """

    def __init__(self, channels: int, num_head_channels: int, qkv_norm: bool = True):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"attention channels {channels} not divisible by num_head_channels {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.qkv_norm = qkv_norm
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    @staticmethod
    def _normalize(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        return x / (eps + norm / math.sqrt(x.shape[-1])).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, S, d)
        if self.qkv_norm:
            q, k, v = self._normalize(q), self._normalize(k), self._normalize(v)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """ADM stride-2 conv downsampling (used only when ``resblock_updown`` is off); key ``op``."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """ADM nearest x2 upsampling followed by a conv3x3 (used only when ``resblock_updown`` is off); key ``conv``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """nn.Sequential that passes the conditioning embedding to the residual blocks (ADM's TimestepEmbedSequential)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x
