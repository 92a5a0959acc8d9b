"""NVlabs EDM's ``SongUNet``: the DDPM++ / NCSN++ networks of Song et al. 2021 as re-implemented by Karras et al. 2022.

The backbone of the EDM CIFAR-10, FFHQ-64 and AFHQv2-64 pickles (docs/models.md#songunet). Submodule and parameter
names follow EDM's ``training/networks.py`` (``map_noise``, ``map_label``, ``map_augment``, ``map_layer0/1``, the
``enc`` / ``dec`` dicts keyed ``<r>x<r>_conv|_down|_block<i>|_aux_*|_in0|_in1|_up``, and inside a block ``norm0``,
``conv0``, ``affine``, ``norm1``, ``conv1``, ``skip``, ``norm2``, ``qkv``, ``proj``), so an EDM state dict, resampling
filters and the Fourier frequencies included, loads with ``strict=True``.

The forward takes this package's call ``(x, noise_t, noise_u=None, class_labels=None, cond=None)``: ``noise_t`` is
EDM's ``c_noise`` (``ln(sigma) / 4`` under EDMPrecond, the wrappers' ``noise_label="log4"``), ``class_labels`` integer
indices (made one-hot here; EDM's ``map_label`` takes one-hot vectors scaled by sqrt(label_dim)) or already one-hot
float rows. The augmentation label input of EDM (``map_augment``) is kept for strict loading but never fed:
sampling runs without augmentation, as in EDM.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from restore.engine.networks.config import NetworkConfig
from restore.engine.networks.layers import SyncDropout, replay_dropout

EMBEDDINGS = ("positional", "fourier")
ENCODERS = ("standard", "skip", "residual")
DECODERS = ("standard", "skip")


def group_count(channels: int) -> int:
    """EDM's GroupNorm group count: 32, or fewer so that every group keeps at least 4 channels."""
    return min(32, channels // 4)


@dataclass(frozen=True, kw_only=True)
class SongUNetConfig(NetworkConfig):
    """Architecture of a `SongUNet` (EDM's constructor arguments, same names and defaults); stored in checkpoints.

    ``attn_resolutions`` are feature-map sizes; the lowest level's first decoder block always attends (EDM's
    ``<r>x<r>_in0``). ``resample_filter`` is the separable FIR of up/down-sampling ((1, 1): box / nearest,
    (1, 3, 3, 1): NCSN++'s). EDM's ``label_dropout`` (classifier-free guidance training) is not kept.
    """

    img_resolution: int
    in_channels: int = 3
    out_channels: int = 3
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.10
    embedding_type: str = "positional"
    channel_mult_noise: int = 1
    encoder_type: str = "standard"
    decoder_type: str = "standard"
    resample_filter: tuple[int, ...] = (1, 1)

    def __post_init__(self) -> None:
        for name in ("channel_mult", "attn_resolutions", "resample_filter"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        levels = len(self.channel_mult)
        if levels < 1 or self.num_blocks < 1 or self.model_channels < 1:
            raise ValueError("channel_mult, num_blocks and model_channels must be non-empty / positive")
        if self.img_resolution % 2 ** (levels - 1):
            raise ValueError(f"img_resolution {self.img_resolution} not divisible by 2^{levels - 1}")
        for value, known, what in ((self.embedding_type, EMBEDDINGS, "embedding_type"),
                                   (self.encoder_type, ENCODERS, "encoder_type"),
                                   (self.decoder_type, DECODERS, "decoder_type")):
            if value not in known:
                raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")
        unknown = sorted(set(self.attn_resolutions) - set(self.level_resolutions))
        if unknown:
            raise ValueError(f"attn_resolutions {unknown} are not level resolutions {self.level_resolutions}")
        widths = {self.model_channels, self.model_channels * self.channel_mult_noise,
                  *(self.model_channels * m for m in self.channel_mult)}
        for w in sorted(widths):
            if w < 4 or w % group_count(w):
                raise ValueError(f"channel width {w} does not split into {group_count(w)} GroupNorm groups")
        if self.embedding_type == "fourier" and self.model_channels * self.channel_mult_noise % 2:
            raise ValueError("the Fourier embedding needs an even number of noise channels")
        if not self.resample_filter or any(v < 0 for v in self.resample_filter) or sum(self.resample_filter) <= 0:
            raise ValueError(f"resample_filter must be non-negative taps with a positive sum: {self.resample_filter}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if min(self.in_channels, self.out_channels) < 1 or min(self.label_dim, self.augment_dim) < 0:
            raise ValueError("in/out channels must be positive, label_dim and augment_dim non-negative")

    @property
    def num_classes(self) -> int:
        """Class count under the ADM config's name (``label_dim``)."""
        return self.label_dim

    cond_channels = 0  # no concatenated condition input (the ADM config's field, for callers that check it)
    family = "SongUNet"  # not a field: the name in NetworkConfig's messages


# EDM's CIFAR-10 networks (train.py --arch=ddpmpp|ncsnpp with the defaults --dropout=0.13 --augment=0.12, which sets
# augment_dim 9): the unconditional / conditional DDPM++ of the FID 1.97 / 1.79 models and the NCSN++ ones.
_CIFAR10_DDPMPP = SongUNetConfig(
    img_resolution=32, augment_dim=9, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
    attn_resolutions=(16,), dropout=0.13, embedding_type="positional", channel_mult_noise=1,
    encoder_type="standard", decoder_type="standard", resample_filter=(1, 1),
)
_CIFAR10_NCSNPP = dataclasses.replace(_CIFAR10_DDPMPP, embedding_type="fourier", channel_mult_noise=2,
                                      encoder_type="residual", resample_filter=(1, 3, 3, 1))
SONG_PRESETS: dict[str, SongUNetConfig] = {
    "cifar10-ddpmpp": _CIFAR10_DDPMPP,
    "cifar10-ddpmpp-cond": dataclasses.replace(_CIFAR10_DDPMPP, label_dim=10),
    "cifar10-ncsnpp": _CIFAR10_NCSNPP,
    "cifar10-ncsnpp-cond": dataclasses.replace(_CIFAR10_NCSNPP, label_dim=10),
}
SongUNetConfig.presets = SONG_PRESETS


def _xavier(layer: nn.Module, fan_in: int, fan_out: int, gain: float = 1.0) -> nn.Module:
    """EDM's ``xavier_uniform`` init (weight and bias drawn from U(+-sqrt(6 / (fan_in + fan_out))) times ``gain``)."""
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
            if p is not None:
                p.uniform_(-bound, bound)
    return layer


def _linear(fan_in: int, fan_out: int, bias: bool = True) -> nn.Linear:
    return _xavier(nn.Linear(fan_in, fan_out, bias=bias), fan_in, fan_out)  # type: ignore[return-value]


class GroupNormEDM(nn.Module):
    """GroupNorm with `group_count` groups, computed in at least fp32 (EDM's ``GroupNorm``: ``weight``, ``bias``)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.num_groups, self.eps = group_count(channels), eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        return F.group_norm(x.to(dt), self.num_groups, self.weight.to(dt), self.bias.to(dt), self.eps).to(x.dtype)


class ResampleConv(nn.Module):
    """Convolution with optional FIR up- or down-sampling by 2 (EDM's ``Conv2d``).

    ``kernel`` 0 means resampling only (no weight). The filter is the outer product of ``taps`` normalised to sum 1,
    kept as the buffer ``resample_filter`` [1, 1, k, k] when resampling. Up: zero-insertion transposed convolution
    with 4 x filter, then the conv; down: filter with stride 2, then the conv; ``fused_down`` (NCSN++'s residual
    encoder branch): the conv first at full resolution with extra padding, then the strided filter.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, bias: bool = True, up: bool = False,
                 down: bool = False, taps: tuple[int, ...] = (1, 1), fused_down: bool = False, gain: float = 1.0):
        super().__init__()
        if up and down:
            raise ValueError("a convolution resamples up or down, not both")
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        self.fused_down = fused_down and down and kernel > 0
        if kernel:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
            self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
            _xavier(self, in_channels * kernel * kernel, out_channels * kernel * kernel, gain)
        else:
            self.weight = self.bias = None
        if up or down:
            f = torch.as_tensor(taps, dtype=torch.float32)
            self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2)[None, None])
        else:
            self.resample_filter = None

    def _filter(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        return self.resample_filter.to(x.dtype).expand(channels, 1, -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if self.resample_filter is None else (self.resample_filter.shape[-1] - 1) // 2
        if self.fused_down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, self._filter(x, self.out_channels), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, 4 * self._filter(x, self.in_channels), groups=self.in_channels, stride=2,
                                       padding=f_pad)
            elif self.down:
                x = F.conv2d(x, self._filter(x, self.in_channels), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)[:, None, None]
        return x


class SongBlock(nn.Module):
    """EDM's ``UNetBlock`` in the DDPM++/NCSN++ setting: additive embedding, skip scale sqrt(1/2), eps 1e-6, one head.

    h = conv0(SiLU(norm0(x))) (resampled), h = SiLU(norm1(h + affine(emb))), h = conv1(dropout(h)),
    x = (h + skip(x)) / sqrt(2) with skip a (resampling) 1x1 conv when shape or resolution changes; with attention,
    x = (x + proj(attend(qkv(norm2(x))))) / sqrt(2), qkv rows ordered (head_dim, three) as in EDM.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, dropout: float,
                 taps: tuple[int, ...], up: bool = False, down: bool = False, attention: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm0 = GroupNormEDM(in_channels, eps=1e-6)
        self.conv0 = ResampleConv(in_channels, out_channels, 3, up=up, down=down, taps=taps)
        self.affine = _linear(emb_channels, out_channels)
        self.norm1 = GroupNormEDM(out_channels, eps=1e-6)
        self.drop = SyncDropout(dropout)
        self.conv1 = ResampleConv(out_channels, out_channels, 3, gain=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = ResampleConv(in_channels, out_channels, 1, up=up, down=down, taps=taps)
        self.attention = attention
        if attention:
            self.norm2 = GroupNormEDM(out_channels, eps=1e-6)
            self.qkv = ResampleConv(out_channels, 3 * out_channels, 1, gain=math.sqrt(0.2))
            self.proj = ResampleConv(out_channels, out_channels, 1, gain=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb).to(h.dtype)[:, :, None, None]))
        h = self.conv1(self.drop(h))
        x = (h + (x if self.skip is None else self.skip(x))) * math.sqrt(0.5)
        if self.attention:
            b, c, hgt, wid = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, c, 3, hgt * wid).unbind(2)  # one head: rows (c, three)
            dt = torch.promote_types(q.dtype, torch.float32)
            logits = torch.einsum("bcq,bck->bqk", q.to(dt), k.to(dt)) / math.sqrt(c)
            attn = logits.softmax(dim=-1).to(v.dtype)
            a = torch.einsum("bqk,bck->bcq", attn, v).reshape(b, c, hgt, wid)
            x = (x + self.proj(a)) * math.sqrt(0.5)
        return x


class PositionalEmbedding(nn.Module):
    """DDPM++ noise embedding: [cos, sin](c w_i) with w_i = 10000^(-i / (n/2 - 1)) (EDM's ``endpoint=True``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        half, dt = self.channels // 2, torch.promote_types(c.dtype, torch.float32)
        freqs = (1.0 / 10_000) ** (torch.arange(half, dtype=dt, device=c.device) / max(half - 1, 1))
        args = torch.outer(c.to(dt), freqs)
        return torch.cat([args.cos(), args.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """NCSN++ noise embedding: [cos, sin](2 pi c f_i) with random frequencies f ~ 16 N(0, 1) (buffer ``freqs``)."""

    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def _apply(self, fn, recurse: bool = True):
        """Casting the module to a 16-bit type keeps ``freqs`` in its own precision (moved to the new device only):
        EDM computes this embedding in fp32 even in fp16 mode, and 16-bit frequencies of magnitude ~50 would shift
        the phases 2 pi c f by ~0.1 rad."""
        kept = self.freqs
        super()._apply(fn, recurse)
        if kept.is_floating_point() and self.freqs.dtype.itemsize < min(4, kept.dtype.itemsize):
            self.freqs = kept.to(self.freqs.device)
        return self

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(c.dtype, torch.float32)
        args = torch.outer(c.to(dt), 2 * math.pi * self.freqs.to(dt))
        return torch.cat([args.cos(), args.sin()], dim=1)


class SongUNet(nn.Module):
    """EDM's DDPM++ / NCSN++ UNet F(x, c_noise[, class_labels]) (docs/models.md#songunet).

    Embedding: e = swap_halves(embed(c_noise)) [sin first] (+ map_label(one_hot(y) sqrt(label_dim))), then
    SiLU(map_layer1(SiLU(map_layer0(e)))). Encoder and decoder as EDM builds them (``enc`` / ``dec`` in order): the
    decoder concatenates a skip whenever a block's input width differs from the running width; the output is the sum
    of the ``aux_conv(SiLU(aux_norm(.)))`` heads (only the full-resolution one with the standard decoder).
    """

    config_class = SongUNetConfig

    def __init__(self, config: SongUNetConfig):
        super().__init__()
        self.config = cfg = config
        mc = cfg.model_channels
        emb_ch, noise_ch = mc * cfg.channel_mult_emb, mc * cfg.channel_mult_noise
        taps = cfg.resample_filter

        def block(cin: int, cout: int, **kw: Any) -> SongBlock:
            return SongBlock(cin, cout, emb_ch, dropout=cfg.dropout, taps=taps, **kw)

        positional = cfg.embedding_type == "positional"
        self.map_noise = PositionalEmbedding(noise_ch) if positional else FourierEmbedding(noise_ch)
        self.map_label = _linear(cfg.label_dim, noise_ch) if cfg.label_dim else None
        self.map_augment = _linear(cfg.augment_dim, noise_ch, bias=False) if cfg.augment_dim else None
        self.map_layer0 = _linear(noise_ch, emb_ch)
        self.map_layer1 = _linear(emb_ch, emb_ch)

        self.enc = nn.ModuleDict()
        cout = caux = cfg.in_channels
        skips: list[int] = []
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = ResampleConv(cout, mc, 3)
                cout = mc
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
                if cfg.encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = ResampleConv(caux, caux, 0, down=True, taps=taps)
                    self.enc[f"{res}x{res}_aux_skip"] = ResampleConv(caux, cout, 1)
                elif cfg.encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = ResampleConv(caux, cout, 3, down=True, taps=taps,
                                                                        fused_down=True)
                    caux = cout
            skips.append(cout)
            for idx in range(cfg.num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = block(cout, mc * mult, attention=res in cfg.attn_resolutions)
                cout = mc * mult
                skips.append(cout)

        self.dec = nn.ModuleDict()
        last = len(cfg.channel_mult) - 1
        for level in reversed(range(len(cfg.channel_mult))):
            mult, res = cfg.channel_mult[level], cfg.img_resolution >> level
            if level == last:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
            for idx in range(cfg.num_blocks + 1):
                attn = idx == cfg.num_blocks and res in cfg.attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = block(cout + skips.pop(), mc * mult, attention=attn)
                cout = mc * mult
            if cfg.decoder_type == "skip" or level == 0:
                if cfg.decoder_type == "skip" and level < last:
                    self.dec[f"{res}x{res}_aux_up"] = ResampleConv(cfg.out_channels, cfg.out_channels, 0, up=True,
                                                                  taps=taps)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNormEDM(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = ResampleConv(cout, cfg.out_channels, 3, gain=1e-5)

        self._dropouts = [m for m in self.modules() if isinstance(m, SyncDropout)]
        for index, m in enumerate(self._dropouts):
            m.index = index

    @contextmanager
    def dropout_seed(self, seed: int) -> Iterator[None]:
        """Replayable dropout masks within the block, as `restore.engine.networks.unet.UNet.dropout_seed`."""
        with replay_dropout(self._dropouts, seed):
            yield

    def _one_hot(self, class_labels: torch.Tensor, batch: int) -> torch.Tensor:
        n = self.config.label_dim
        if class_labels.is_floating_point() and class_labels.ndim == 2 and class_labels.shape[1] == n:
            return class_labels.float()  # already one-hot (or EDM's all-zero "no label") rows
        labels = class_labels.reshape(-1).long()
        if labels.shape[0] != batch or labels.min() < 0 or labels.max() >= n:
            raise ValueError(f"class_labels must be {batch} indices in [0, {n}) or ({batch}, {n}) one-hot rows")
        return F.one_hot(labels, n).float()

    def forward(self, x: torch.Tensor, noise_t: torch.Tensor, noise_u: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        cfg, b = self.config, x.shape[0]
        if noise_u is not None:
            raise ValueError("a SongUNet has a single noise input: noise_u is not accepted")
        if cond is not None:
            raise ValueError("a SongUNet takes no concatenated condition (cond)")
        if (class_labels is None) != (cfg.label_dim == 0):
            raise ValueError(f"class_labels required iff label_dim > 0 (label_dim={cfg.label_dim})")

        dtype = self.map_layer0.weight.dtype
        c = torch.as_tensor(noise_t, device=x.device).reshape(-1).expand(b)
        emb = self.map_noise(c)
        emb = torch.cat(emb.chunk(2, dim=1)[::-1], dim=1).to(dtype)  # EDM swaps the halves: [sin, cos]
        if self.map_label is not None:
            emb = emb + self.map_label((self._one_hot(class_labels, b) * math.sqrt(cfg.label_dim)).to(dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        h = aux = x.to(dtype)
        skips = []
        for name, layer in self.enc.items():
            if name.endswith("_aux_down"):
                aux = layer(aux)
            elif name.endswith("_aux_skip"):
                h = skips[-1] = h + layer(aux)
            elif name.endswith("_aux_residual"):
                h = skips[-1] = aux = (h + layer(aux)) * math.sqrt(0.5)
            else:
                h = layer(h, emb) if isinstance(layer, SongBlock) else layer(h)
                skips.append(h)

        out = head = None
        for name, layer in self.dec.items():
            if name.endswith("_aux_up"):
                out = layer(out)
            elif name.endswith("_aux_norm"):
                head = layer(h)
            elif name.endswith("_aux_conv"):
                head = layer(F.silu(head))
                out = head if out is None else head + out
            else:
                if h.shape[1] != layer.in_channels:
                    h = torch.cat([h, skips.pop()], dim=1)
                h = layer(h, emb)
        return out.to(x.dtype)


__all__ = ["SONG_PRESETS", "SongUNet", "SongUNetConfig", "group_count"]
