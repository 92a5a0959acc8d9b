"""NVlabs EDM network pickles (`restore convert --from edm-pkl`): restricted unpickling, DhariwalUNet -> ADM UNet,
the SongUNet backbone, and round trips.

The pickles are written here in the structure of the official files (docs/models.md#upstream-checkpoints): a dict
whose ``ema`` is a tree of ``torch_utils.persistence`` objects, each reducing to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with an embedded module source, plain
``torch.nn.ModuleDict`` containers, parameters as torch's rebuild calls, numpy scalars in init kwargs. The official
module name exists in ``sys.modules`` only while a file is written, so reading can never import it.

The network equations are checked against direct implementations written here from the official forward
(EDM ``training/networks.py``, as described in docs/models.md): functional code over EDM's own key names that shares
nothing with the package's modules (own GroupNorm, zero-insertion upsampling, per-head attention loops).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from restore.app.cli import main as restore_main
from restore.engine.checkpoints import load_model, read_metadata
from restore.engine.convert import convert_checkpoint
from restore.engine.convert.edm_pkl import (
    SnapshotUnpickler,
    dhariwal_config,
    dhariwal_to_adm,
    read_edm_pkl,
    read_edm_snapshot,
)
from restore.engine.networks import SongUNet, SongUNetConfig, UNet, UNetConfig, count_parameters
from restore.engine.wrappers import EDMDenoiser

LAYOUT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "checkpoints" / "edm_imagenet64_layout.json"
PERSISTENCE = "torch_utils.persistence"
# Globals of a real network snapshot (docs/models.md#upstream-checkpoints); numpy 2 spells the scalar numpy._core.
OFFICIAL_GLOBALS = {f"{PERSISTENCE} _reconstruct_persistent_obj", "collections OrderedDict",
                    "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter",
                    "torch.storage _load_from_bytes",
                    "torch.nn.modules.container ModuleDict", "numpy dtype", "numpy.core.multiarray scalar",
                    "numpy._core.multiarray scalar", "builtins set"}
MODULE_SRC = "# stand-in for the embedded training/networks.py source\nimport os\nos.system('touch pwned')\n"

# --- layouts of the official constructors ---------------------------------------------------------------------------


def edm_layout(arch: str, *, img_resolution: int, in_channels: int = 3, out_channels: int = 3, label_dim: int = 0,
               augment_dim: int = 0, model_channels: int, channel_mult, num_blocks: int, attn_resolutions,
               embedding_type: str = "positional", channel_mult_noise: int = 1, encoder_type: str = "standard",
               decoder_type: str = "standard", resample_filter=(1, 1), **_) -> OrderedDict:
    """EDM state-dict names -> shapes (registration order) of DhariwalUNet (``arch="adm"``) or SongUNet ("song")."""
    mc, dhariwal = model_channels, arch == "adm"
    emb = 4 * mc
    noise = mc if dhariwal else mc * channel_mult_noise
    taps = (1, 1) if dhariwal else tuple(resample_filter)
    lay: OrderedDict = OrderedDict()

    def linear(name, fan_in, fan_out, bias=True):
        lay[f"{name}.weight"] = (fan_out, fan_in)
        if bias:
            lay[f"{name}.bias"] = (fan_out,)

    def conv(name, cin, cout, kernel, resample=False):
        if kernel:
            lay[f"{name}.weight"] = (cout, cin, kernel, kernel)
            lay[f"{name}.bias"] = (cout,)
        if resample:
            lay[f"{name}.resample_filter"] = (1, 1, len(taps), len(taps))

    def norm(name, c):
        lay[f"{name}.weight"] = (c,)
        lay[f"{name}.bias"] = (c,)

    def block(name, cin, cout, up=False, down=False, attention=False):
        norm(f"{name}.norm0", cin)
        conv(f"{name}.conv0", cin, cout, 3, up or down)
        linear(f"{name}.affine", emb, cout * (2 if dhariwal else 1))
        norm(f"{name}.norm1", cout)
        conv(f"{name}.conv1", cout, cout, 3)
        if cout != cin or up or down:  # DhariwalUNet: no projection for a same-width resampling skip
            conv(f"{name}.skip", cin, cout, 1 if (not dhariwal or cout != cin) else 0, up or down)
        if attention:
            norm(f"{name}.norm2", cout)
            conv(f"{name}.qkv", cout, 3 * cout, 1)
            conv(f"{name}.proj", cout, cout, 1)

    if dhariwal:
        if augment_dim:
            linear("map_augment", augment_dim, mc, bias=False)
        linear("map_layer0", mc, emb)
        linear("map_layer1", emb, emb)
        if label_dim:
            linear("map_label", label_dim, emb, bias=False)
    else:
        if embedding_type == "fourier":
            lay["map_noise.freqs"] = (noise // 2,)
        if label_dim:
            linear("map_label", label_dim, noise)
        if augment_dim:
            linear("map_augment", augment_dim, noise, bias=False)
        linear("map_layer0", noise, emb)
        linear("map_layer1", emb, emb)
    cout, caux, skips = in_channels, in_channels, []
    for level, mult in enumerate(channel_mult):
        r = img_resolution >> level
        if level == 0:
            first = mc * mult if dhariwal else mc
            conv(f"enc.{r}x{r}_conv", cout, first, 3)
            cout = first
        else:
            block(f"enc.{r}x{r}_down", cout, cout, down=True)
            if encoder_type == "skip":
                conv(f"enc.{r}x{r}_aux_down", caux, caux, 0, True)
                conv(f"enc.{r}x{r}_aux_skip", caux, cout, 1)
            if encoder_type == "residual":
                conv(f"enc.{r}x{r}_aux_residual", caux, cout, 3, True)
                caux = cout
        skips.append(cout)
        for i in range(num_blocks):
            block(f"enc.{r}x{r}_block{i}", cout, mc * mult, attention=r in attn_resolutions)
            cout = mc * mult
            skips.append(cout)
    for level in reversed(range(len(channel_mult))):
        r, mult = img_resolution >> level, channel_mult[level]
        if level == len(channel_mult) - 1:
            block(f"dec.{r}x{r}_in0", cout, cout, attention=True)
            block(f"dec.{r}x{r}_in1", cout, cout)
        else:
            block(f"dec.{r}x{r}_up", cout, cout, up=True)
        for i in range(num_blocks + 1):
            attention = r in attn_resolutions and (dhariwal or i == num_blocks)
            block(f"dec.{r}x{r}_block{i}", cout + skips.pop(), mc * mult, attention=attention)
            cout = mc * mult
        if not dhariwal and (decoder_type == "skip" or level == 0):
            if decoder_type == "skip" and level < len(channel_mult) - 1:
                conv(f"dec.{r}x{r}_aux_up", out_channels, out_channels, 0, True)
            norm(f"dec.{r}x{r}_aux_norm", cout)
            conv(f"dec.{r}x{r}_aux_conv", cout, out_channels, 3)
    if dhariwal:
        norm("out_norm", cout)
        conv("out_conv", cout, out_channels, 3)
    return lay


def fir(taps) -> torch.Tensor:
    f = torch.as_tensor(taps, dtype=torch.float64)
    return (f[:, None] * f[None, :] / f.sum() ** 2)[None, None]


def random_weights(layout: OrderedDict, taps, seed: int = 0) -> OrderedDict:
    """Random EDM-layout tensors (fp32) of unit-scale activations; filters hold their real values."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for key, shape in layout.items():
        if key.endswith("resample_filter"):
            sd[key] = fir(taps).float()
        elif key.endswith("freqs"):
            sd[key] = torch.randn(shape, generator=g) * 16
        elif len(shape) == 1 and (".norm" in key or "aux_norm" in key or "out_norm" in key):
            sd[key] = (1 + 0.2 * torch.randn(shape, generator=g)) if key.endswith("weight") else \
                0.2 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return sd


# --- direct implementations of the official forward ------------------------------------------------------------------


def gn(x, weight, bias, eps):
    """Group normalisation with EDM's group count min(32, C // 4), written out."""
    b, c = x.shape[:2]
    g = min(32, c // 4)
    xs = x.reshape(b, g, -1)
    xs = (xs - xs.mean(-1, keepdim=True)) / torch.sqrt(xs.var(-1, unbiased=False, keepdim=True) + eps)
    return xs.reshape(x.shape) * weight[:, None, None] + bias[:, None, None]


def resample(x, f, up):
    """Depthwise FIR resampling by 2: zero insertion + padding + 4 f (up), or filter with stride 2 (down)."""
    c, k = x.shape[1], f.shape[-1]
    p = (k - 1) // 2
    if up:
        z = x.new_zeros(x.shape[0], c, 2 * x.shape[2] - 1, 2 * x.shape[3] - 1)
        z[:, :, ::2, ::2] = x
        z = F.pad(z, [k - 1 - p] * 4)
        return F.conv2d(z, (4 * f).flip(-1, -2).expand(c, 1, k, k), groups=c)
    return F.conv2d(F.pad(x, [p] * 4), f.expand(c, 1, k, k), groups=c, stride=2)


class Direct:
    """EDM's DhariwalUNet / SongUNet forward over a flat EDM state dict (float64)."""

    def __init__(self, arch: str, sd, cfg: dict):
        self.arch, self.cfg = arch, cfg
        self.P = {k: v.double() for k, v in sd.items()}
        self.taps = (1, 1) if arch == "adm" else tuple(cfg.get("resample_filter", (1, 1)))
        self.order = list(OrderedDict.fromkeys(".".join(k.split(".")[:2]) for k in sd if k[:4] in ("enc.", "dec.")))
        self.used = set()

    def p(self, key):
        self.used.add(key)
        return self.P.get(key)

    def has(self, prefix):
        return any(k.startswith(prefix + ".") for k in self.P)

    def conv(self, name, x, up=False, down=False, fused=False):
        w, b = self.p(f"{name}.weight"), self.p(f"{name}.bias")
        if up or down:
            f = fir(self.taps)
            stored = self.p(f"{name}.resample_filter")
            assert torch.equal(stored, f)
        if fused:  # conv at full resolution (padded for the filter), then the strided filter
            x = F.conv2d(x, w, padding=w.shape[-1] // 2 + (f.shape[-1] - 1) // 2)
            x = F.conv2d(x, f.expand(x.shape[1], 1, -1, -1), groups=x.shape[1], stride=2)
        else:
            if up or down:
                x = resample(x, f, up)
            if w is not None:
                x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        return x if b is None else x + b[:, None, None]

    def norm(self, name, x, eps):
        return gn(x, self.p(f"{name}.weight"), self.p(f"{name}.bias"), eps)

    def linear(self, name, x):
        y = x @ self.p(f"{name}.weight").T
        b = self.p(f"{name}.bias")
        return y if b is None else y + b

    def block(self, name, x, emb):
        adm = self.arch == "adm"
        eps, scale_skip = (1e-5, 1.0) if adm else (1e-6, math.sqrt(0.5))
        up, down = name.endswith("_up"), name.endswith("_down")
        h = self.conv(f"{name}.conv0", F.silu(self.norm(f"{name}.norm0", x, eps)), up=up, down=down)
        params = self.linear(f"{name}.affine", emb)[:, :, None, None]
        if adm:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(self.norm(f"{name}.norm1", h, eps) * (1 + scale) + shift)
        else:
            h = F.silu(self.norm(f"{name}.norm1", h + params, eps))
        h = self.conv(f"{name}.conv1", h)
        skip = self.conv(f"{name}.skip", x, up=up, down=down) if self.has(f"{name}.skip") else x
        x = (h + skip) * scale_skip
        if f"{name}.qkv.weight" in self.P:
            b, c, hh, ww = x.shape
            heads = c // 64 if adm else 1
            d = c // heads
            qkv = self.conv(f"{name}.qkv", self.norm(f"{name}.norm2", x, eps)).reshape(b, heads, d, 3, hh * ww)
            outs = []
            for i in range(heads):
                q, k, v = qkv[:, i, :, 0], qkv[:, i, :, 1], qkv[:, i, :, 2]  # (b, d, S)
                w = torch.softmax(torch.einsum("bdq,bdk->bqk", q, k) / math.sqrt(d), dim=-1)
                outs.append(torch.einsum("bqk,bdk->bdq", w, v))
            a = torch.cat(outs, dim=1).reshape(b, c, hh, ww)
            x = (self.conv(f"{name}.proj", a) + x) * scale_skip
        return x

    def embedding(self, c_noise, onehot):
        cfg = self.cfg
        if self.arch == "adm":
            half = cfg["model_channels"] // 2
            freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float64) / half)
            a = c_noise[:, None] * freqs[None]
            emb = torch.cat([a.cos(), a.sin()], dim=1)
            emb = self.linear("map_layer1", F.silu(self.linear("map_layer0", emb)))
            if onehot is not None:
                emb = emb + onehot @ self.p("map_label.weight").T
            return F.silu(emb)
        n = cfg["model_channels"] * cfg.get("channel_mult_noise", 1)
        if cfg.get("embedding_type", "positional") == "positional":
            freqs = (1 / 10000) ** (torch.arange(n // 2, dtype=torch.float64) / (n // 2 - 1))
        else:
            freqs = 2 * math.pi * self.p("map_noise.freqs")
        a = c_noise[:, None] * freqs[None]
        emb = torch.cat([a.sin(), a.cos()], dim=1)  # EDM's swapped halves
        if onehot is not None:
            emb = emb + self.linear("map_label", onehot * math.sqrt(onehot.shape[1]))
        return F.silu(self.linear("map_layer1", F.silu(self.linear("map_layer0", emb))))

    def __call__(self, x, c_noise, onehot=None):
        x, c_noise = x.double(), c_noise.double()
        onehot = None if onehot is None else onehot.double()
        emb = self.embedding(c_noise, onehot)
        skips, aux = [], x
        for name in self.order:
            if not name.startswith("enc."):
                continue
            if name.endswith("_conv"):
                x = self.conv(name, x)
                skips.append(x)
            elif name.endswith("_aux_down"):
                aux = self.conv(name, aux, down=True)
            elif name.endswith("_aux_skip"):
                x = skips[-1] = x + self.conv(name, aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + self.conv(name, aux, down=True, fused=True)) / math.sqrt(2)
            else:
                x = self.block(name, x, emb)
                skips.append(x)
        out = head = None
        for name in self.order:
            if not name.startswith("dec."):
                continue
            if name.endswith("_aux_up"):
                out = self.conv(name, out, up=True)
            elif name.endswith("_aux_norm"):
                head = self.norm(name, x, 1e-6)
            elif name.endswith("_aux_conv"):
                head = self.conv(name, F.silu(head))
                out = head if out is None else out + head
            else:
                if x.shape[1] != self.P[f"{name}.norm0.weight"].shape[0]:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = self.block(name, x, emb)
        if self.arch == "adm":
            out = self.conv("out_conv", F.silu(self.norm("out_norm", x, 1e-5)))
        return out


# --- writing official-structure pickles -------------------------------------------------------------------------------


@contextlib.contextmanager
def official_module_names():
    """``torch_utils.persistence._reconstruct_persistent_obj`` importable while a file is written, then gone."""
    assert "torch_utils" not in sys.modules
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType(PERSISTENCE)

    def _reconstruct_persistent_obj(meta):  # never called: reading must not resolve this name
        raise AssertionError("the official reconstruction function was called")

    _reconstruct_persistent_obj.__module__ = PERSISTENCE
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    sys.modules.update({"torch_utils": pkg, PERSISTENCE: mod})
    try:
        yield _reconstruct_persistent_obj
    finally:
        del sys.modules["torch_utils"], sys.modules[PERSISTENCE]


class Persistent(nn.Module):
    """Stand-in for a ``@persistence.persistent_class`` module: reduces like the official decorator does."""

    def __init__(self, class_name: str, init_kwargs: dict | None = None, **attributes):
        super().__init__()
        self._edm_class = class_name
        self._init_args = ()
        self._init_kwargs = dict(init_kwargs or {})
        for k, v in attributes.items():
            setattr(self, k, v)

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items() if k != "_edm_class"}
        meta = dict(type="class", version=getattr(self, "persistence_version", 6), module_src=MODULE_SRC,
                    class_name=self._edm_class, state=state)
        return (sys.modules[PERSISTENCE]._reconstruct_persistent_obj, (meta,))


def snapshot_tree(sd: OrderedDict, *, precond: str, network: str, network_kwargs: dict, precond_kwargs: dict):
    """An ``ema`` module tree holding ``sd`` (keys ``model.<...>``) the way EDM's modules hold it."""
    root = Persistent(precond, precond_kwargs, img_resolution=network_kwargs["img_resolution"],
                      label_dim=network_kwargs.get("label_dim", 0), use_fp16=False, sigma_min=0,
                      sigma_max=float("inf"), sigma_data=0.5)
    root.register_buffer("scratch", torch.ones(2), persistent=False)  # not part of the state dict
    nodes: dict[str, nn.Module] = {"": root}
    for key, t in sd.items():
        path, pname = key.rsplit(".", 1)
        parts = path.split(".")
        for depth in range(1, len(parts) + 1):
            sub = ".".join(parts[:depth])
            if sub in nodes:
                continue
            if sub in ("model.enc", "model.dec"):
                child = nn.ModuleDict()
            elif sub == "model":
                child = Persistent(network, network_kwargs, label_dropout=0)
                if not any(k.startswith("model.map_augment.") for k in sd):
                    child.map_augment = None  # EDM keeps an absent layer as a plain None attribute
            else:
                child = Persistent("UNetBlock" if depth == 3 and sub.startswith("model.e") else "Conv2d",
                                   {"init_weight": np.float64(np.sqrt(1 / 3))}, skip_scale=np.sqrt(0.5))
            nodes[".".join(parts[:depth - 1])].add_module(parts[depth - 1], child)
            nodes[sub] = child
        node = nodes[path]
        if pname in ("resample_filter", "freqs"):
            node.register_buffer(pname, t.clone())
        else:
            node.register_parameter(pname, nn.Parameter(t.clone(), requires_grad=False))
    for path, node in nodes.items():  # the None entries EDM modules keep (no filter, no bias)
        if path.endswith("conv1"):
            node.register_buffer("resample_filter", None)
        if path == "model.map_label" and "bias" not in node._parameters:
            node.register_parameter("bias", None)
    return root


def write_pickle(path: Path, sd: OrderedDict, *, network: str, network_kwargs: dict, precond: str = "EDMPrecond",
                 extra_state: dict | None = None) -> Path:
    precond_kwargs = {"model_type": network, "use_fp16": True, **network_kwargs}
    with official_module_names() as reconstruct:
        ema = snapshot_tree(sd, precond=precond, network=network, network_kwargs=network_kwargs,
                            precond_kwargs=precond_kwargs)
        for k, v in (extra_state or {}).items():
            setattr(ema.model, k, v)
        data = dict(ema=ema, loss_fn=Persistent("EDMLoss", {}, P_mean=-1.2), augment_pipe=None,
                    dataset_kwargs={"class_name": "training.dataset.ImageFolderDataset"})
        path.write_bytes(pickle.dumps(data))
        assert reconstruct is not None
    return path


def pickle_globals(path: Path) -> set[str]:
    """The globals a readable snapshot references, as "module name" (recorded while reading it)."""
    found: set[str] = set()

    class Recording(SnapshotUnpickler):
        def find_class(self, module, name):
            found.add(f"{module} {name}")
            return super().find_class(module, name)

    with open(path, "rb") as f:
        Recording(f).load()
    return found


# --- configurations ---------------------------------------------------------------------------------------------------

ADM_SMALL = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=5, model_channels=128,
                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16, 8], dropout=0.1)
ADM_IMAGENET = dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, model_channels=192,
                    channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.1)
SONG_SMALL = {
    "ddpmpp": dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=4, augment_dim=9, model_channels=16,
                   channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8], dropout=0.13,
                   embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                   decoder_type="standard", resample_filter=[1, 1]),
    "ncsnpp": dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=0, augment_dim=9, model_channels=16,
                   channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8], dropout=0.13,
                   embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                   decoder_type="standard", resample_filter=[1, 3, 3, 1]),
    "skip-skip": dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=0, model_channels=16,
                      channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[16, 4], dropout=0.0,
                      embedding_type="fourier", channel_mult_noise=2, encoder_type="skip",
                      decoder_type="skip", resample_filter=[1, 3, 3, 1]),
}
SONG_DEFAULTS = dict(num_blocks=4, attn_resolutions=[16])  # EDM defaults, not recorded in the pickles


def recorded_kwargs(cfg: dict) -> dict:
    """The SongUNet init kwargs a released pickle records: what train.py passes (defaults like num_blocks are not)."""
    kw = {k: v for k, v in cfg.items() if not (k in SONG_DEFAULTS and v == SONG_DEFAULTS[k])}
    kw["dropout"] = np.float64(kw["dropout"])  # numpy scalars occur in recorded kwargs
    return kw


# --- tests: the restricted unpickler ---------------------------------------------------------------------------------


def test_snapshot_is_read_exactly_and_references_only_official_globals(tmp_path):
    cfg = SONG_SMALL["ncsnpp"]
    sd = random_weights(edm_layout("song", **cfg), cfg["resample_filter"])
    full = OrderedDict((f"model.{k}", v) for k, v in sd.items())
    path = write_pickle(tmp_path / "net.pkl", full, network="SongUNet", network_kwargs=recorded_kwargs(cfg))
    assert "torch_utils" not in sys.modules
    found = pickle_globals(path)
    assert f"{PERSISTENCE} _reconstruct_persistent_obj" in found and found <= OFFICIAL_GLOBALS, found

    snap = read_edm_snapshot(path)
    assert (snap.precond, snap.network) == ("EDMPrecond", "SongUNet")
    assert list(snap.state_dict) == list(full)  # the official state_dict() order; None and non-persistent skipped
    assert all(torch.equal(snap.state_dict[k], v) for k, v in full.items())
    assert snap.network_kwargs["dropout"] == 0.13 and type(snap.network_kwargs["dropout"]) is float
    assert snap.precond_kwargs["model_type"] == "SongUNet" and snap.attributes["sigma_data"] == 0.5
    assert snap.extra_keys == ["augment_pipe", "dataset_kwargs", "loss_fn"]
    assert len(snap.source_sha256) == 64
    assert "torch_utils" not in sys.modules  # nothing was imported while reading


class Evil:
    """Unpickling it would run a command chosen by the file's author."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": Evil(marker)}))
    with pytest.raises(ValueError, match=r"refusing global (posix|os|nt)\.system") as info:
        read_edm_snapshot(evil)
    assert "\n" not in str(info.value) and "nothing from it was executed" in str(info.value)

    # The payload hidden inside an otherwise official-looking snapshot, as an attribute of the network.
    cfg = SONG_SMALL["ddpmpp"]
    sd = OrderedDict((f"model.{k}", v) for k, v in random_weights(edm_layout("song", **cfg), (1, 1)).items())
    hidden = write_pickle(tmp_path / "hidden.pkl", sd, network="SongUNet", network_kwargs=recorded_kwargs(cfg),
                          extra_state={"payload": Evil(marker)})
    with pytest.raises(ValueError, match="refusing global"):
        read_edm_pkl(hidden)
    result = CliRunner().invoke(restore_main, ["convert", str(hidden), str(tmp_path / "out.safetensors"),
                                               "--from", "edm-pkl"])
    assert result.exit_code != 0 and "refusing global" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not marker.exists() and not (Path.cwd() / "pwned").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pkl", "hidden.pkl"]  # no trace, no output file


def test_other_persistence_versions_and_layouts_are_refused(tmp_path):
    cfg = SONG_SMALL["ddpmpp"]
    sd = OrderedDict((f"model.{k}", v) for k, v in random_weights(edm_layout("song", **cfg), (1, 1)).items())
    path = write_pickle(tmp_path / "v5.pkl", sd, network="SongUNet", network_kwargs=recorded_kwargs(cfg),
                        extra_state={"persistence_version": 5})
    with pytest.raises(ValueError, match="unsupported persistent object .*version=5"):
        read_edm_snapshot(path)
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"model": [1, 2]}))
    with pytest.raises(ValueError, match="not an EDM network pickle"):
        read_edm_snapshot(tmp_path / "plain.pkl")
    bad_state = write_pickle(tmp_path / "bad.pkl", sd, network="SongUNet", network_kwargs=recorded_kwargs(cfg),
                             extra_state={"_parameters": [1, 2]})
    with pytest.raises(ValueError, match="malformed module state") as info:
        read_edm_snapshot(bad_state)
    assert "\n" not in str(info.value)
    vp = write_pickle(tmp_path / "vp.pkl", sd, network="SongUNet", network_kwargs=recorded_kwargs(cfg),
                      precond="VPPrecond")
    with pytest.raises(ValueError, match="uses VPPrecond; only EDMPrecond"):
        read_edm_pkl(vp)


def test_truncated_pickle_is_one_line(tmp_path):
    cfg = SONG_SMALL["ddpmpp"]
    sd = OrderedDict((f"model.{k}", v) for k, v in random_weights(edm_layout("song", **cfg), (1, 1)).items())
    path = write_pickle(tmp_path / "net.pkl", sd, network="SongUNet", network_kwargs=recorded_kwargs(cfg))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 10):
        bad = tmp_path / f"cut{cut}.pkl"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"not a readable EDM network pickle") as info:
            read_edm_snapshot(bad)
        assert "\n" not in str(info.value)
    result = CliRunner().invoke(restore_main, ["convert", str(bad), str(tmp_path / "o.safetensors"),
                                               "--from", "edm-pkl"])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1
    assert "not a readable EDM network pickle" in result.output


# --- tests: DhariwalUNet (ImageNet-64) -> ADM UNet -------------------------------------------------------------------


def test_dhariwal_layout_matches_the_official_file():
    if not LAYOUT.is_file():
        pytest.skip(f"{LAYOUT} not found")
    ref = json.loads(LAYOUT.read_text())
    lay = edm_layout("adm", **ADM_IMAGENET)
    params = OrderedDict((f"model.{k}", list(s)) for k, s in lay.items() if not k.endswith("resample_filter"))
    assert list(params.items()) == list(ref["keys"].items())
    assert {f"model.{k}" for k in lay if k.endswith("resample_filter")} == set(ref["buffers"])
    assert sum(math.prod(s) for s in params.values()) == ref["num_params"] == 295_899_267


def test_full_imagenet64_conversion_on_meta():
    """The official key set, renamed, is exactly the ADM UNet's (keys and shapes); 295,899,267 parameters."""
    if LAYOUT.is_file():
        ref = json.loads(LAYOUT.read_text())
        shapes = {**ref["keys"], **{k: v["shape"] for k, v in ref["buffers"].items()}}
        kwargs = ref["modules"]["model"]["init_kwargs"]
    else:
        shapes = {f"model.{k}": s for k, s in edm_layout("adm", **ADM_IMAGENET).items()}
        kwargs = {k: v for k, v in ADM_IMAGENET.items() if k not in ("num_blocks", "attn_resolutions")}
    sd = {k.removeprefix("model."): torch.empty(s, device="meta") for k, s in shapes.items()}
    config = dhariwal_config(sd, kwargs)
    assert config == UNetConfig(img_resolution=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                                attention_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                                num_classes=1000, qkv_norm=False, scale_shift_norm=True)
    adm = dhariwal_to_adm(sd)
    with torch.device("meta"):
        net = UNet(config)
    assert {k: tuple(v.shape) for k, v in adm.items()} == {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert count_parameters(net) == 295_899_267
    net.load_state_dict(adm, strict=True, assign=True)


@pytest.fixture(scope="module")
def adm_pickle(tmp_path_factory):
    sd = random_weights(edm_layout("adm", **ADM_SMALL), (1, 1), seed=1)
    kwargs = {k: v for k, v in ADM_SMALL.items() if k != "num_blocks"}  # num_blocks 1 is not the default: recorded
    kwargs["num_blocks"] = 1
    path = tmp_path_factory.mktemp("adm") / "edm-tiny-cond-adm.pkl"
    write_pickle(path, OrderedDict((f"model.{k}", v) for k, v in sd.items()), network="DhariwalUNet",
                 network_kwargs=kwargs)
    return path, sd


def test_converted_dhariwal_unet_matches_the_official_equations(adm_pickle):
    path, sd = adm_pickle
    model = read_edm_pkl(path)
    assert isinstance(model, EDMDenoiser) and model.noise_label == "log4" and isinstance(model.net, UNet)
    cfg = model.net.config
    assert (cfg.num_res_blocks, cfg.attention_resolutions, cfg.num_classes, cfg.scale_shift_norm, cfg.qkv_norm) == \
        (1, (16, 8), 5, True, False)
    direct = Direct("adm", sd, ADM_SMALL)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    labels = torch.tensor([0, 4, 2])
    c_noise = torch.tensor([-1.2, 0.1, 1.1])
    ref = direct(x, c_noise, F.one_hot(labels, 5))
    assert direct.used >= {k for k in sd if not k.endswith("resample_filter")}  # every weight takes part
    out = model.net(x, c_noise, class_labels=labels)
    err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err < 2e-5, err  # float32 network vs float64 reference (measured ~5e-7)

    sigma = torch.tensor([0.02, 1.0, 60.0])
    s = sigma[:, None, None, None].double()
    c_in, c_skip, c_out = 1 / (s**2 + 0.25).sqrt(), 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt()
    d_ref = c_skip * x.double() + c_out * direct(c_in * x.double(), sigma.double().log() / 4, F.one_hot(labels, 5))
    d = model(x, sigma, class_labels=labels)
    assert (d.double() - d_ref).abs().max().item() < 2e-5 * d_ref.abs().max().item()


# --- tests: SongUNet -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["cifar10-ddpmpp", "cifar10-ddpmpp-cond", "cifar10-ncsnpp", "cifar10-ncsnpp-cond"])
def test_songunet_full_configs_match_the_official_layout(preset):
    config = SongUNetConfig.preset(preset)
    with torch.device("meta"):
        net = SongUNet(config)
    lay = edm_layout("song", **config.to_dict())
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == [(k, tuple(s)) for k, s in lay.items()]
    counts = {"cifar10-ddpmpp": 55_733_891, "cifar10-ddpmpp-cond": 55_735_299, "cifar10-ncsnpp": 56_397_827,
              "cifar10-ncsnpp-cond": 56_400_643}
    assert count_parameters(net) == counts[preset]
    assert SongUNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("variant", sorted(SONG_SMALL))
def test_songunet_matches_the_official_equations(variant, tmp_path):
    cfg = SONG_SMALL[variant]
    sd = random_weights(edm_layout("song", **cfg), cfg["resample_filter"], seed=2)
    path = write_pickle(tmp_path / f"{variant}.pkl", OrderedDict((f"model.{k}", v) for k, v in sd.items()),
                        network="SongUNet", network_kwargs=recorded_kwargs(cfg))
    model = read_edm_pkl(path)
    assert isinstance(model.net, SongUNet) and model.noise_label == "log4"
    assert model.net.config == SongUNetConfig.from_dict(cfg)
    direct = Direct("song", sd, cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g)
    c_noise = torch.tensor([-1.5, 0.0, 1.1])
    labels = torch.tensor([3, 0, 1]) if cfg["label_dim"] else None
    onehot = None if labels is None else F.one_hot(labels, cfg["label_dim"])
    ref = direct(x, c_noise, onehot)
    assert direct.used >= {k for k in sd if "map_augment" not in k}  # every weight takes part (augment: unused)
    net64 = model.net.double()
    out64 = net64(x.double(), c_noise.double(), class_labels=labels)
    assert (out64 - ref).abs().max().item() < 1e-10 * ref.abs().max().item()  # same equations: float64 agrees
    out32 = model.net.float()(x, c_noise, class_labels=labels)
    assert (out32.double() - ref).abs().max().item() < 2e-5 * ref.abs().max().item()
    if labels is not None:  # one-hot rows are accepted as they are
        torch.testing.assert_close(model.net(x, c_noise, class_labels=onehot.float()), out32, rtol=0, atol=0)


def test_songunet_argument_checks():
    net = SongUNet(SongUNetConfig.from_dict(SONG_SMALL["ddpmpp"])).eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="class_labels required"):
        net(x, torch.zeros(2))
    with pytest.raises(ValueError, match="noise_u is not accepted"):
        net(x, torch.zeros(2), noise_u=torch.zeros(2), class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"indices in \[0, 4\)"):
        net(x, torch.zeros(2), class_labels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="unknown encoder_type"):
        SongUNetConfig(img_resolution=16, encoder_type="progressive")
    with pytest.raises(ValueError, match="unknown SongUNetConfig keys"):
        SongUNetConfig.from_dict({"img_resolution": 16, "num_res_blocks": 2})


# --- tests: conversion round trips and use as a prior ----------------------------------------------------------------


def test_round_trip_through_safetensors(tmp_path, adm_pickle):
    cfg = SONG_SMALL["ddpmpp"]
    sd = random_weights(edm_layout("song", **cfg), (1, 1), seed=3)
    src = write_pickle(tmp_path / "edm-cifar10-32x32-cond-vp.pkl", OrderedDict((f"model.{k}", v) for k, v in
                       sd.items()), network="SongUNet", network_kwargs=recorded_kwargs(cfg))
    result = CliRunner().invoke(restore_main, ["convert", str(src), str(tmp_path / "song.safetensors"),
                                               "--from", "edm-pkl"])
    assert result.exit_code == 0, result.output
    meta = read_metadata(tmp_path / "song.safetensors")
    assert (meta["network"], meta["wrapper"], meta["wrapper_config"]) == ("song", "edm", {"noise_label": "log4"})
    assert meta["card"]["source"] == src.name and meta["card"]["source_format"] == "edm-pkl"
    loaded, direct = load_model(tmp_path / "song.safetensors"), read_edm_pkl(src)
    assert isinstance(loaded.net, SongUNet) and loaded.net.config == direct.net.config
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 5.0]), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(x, sigma, class_labels=labels), direct.eval()(x, sigma, class_labels=labels),
                               rtol=0, atol=0)

    adm_src, _ = adm_pickle
    out = convert_checkpoint(adm_src, tmp_path / "adm.safetensors", "edm-pkl", img_resolution=16)
    assert read_metadata(out)["network"] == "adm"
    loaded, direct = load_model(out), read_edm_pkl(adm_src)
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 4])
    torch.testing.assert_close(loaded(x, sigma, class_labels=labels), direct.eval()(x, sigma, class_labels=labels),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="disagrees with the pickle's img_resolution 16"):
        read_edm_pkl(adm_src, img_resolution=64)
    with pytest.raises(ValueError, match="'edm' wrapper only"):
        read_edm_pkl(adm_src, wrapper="cm")


def test_half_precision_keeps_the_fourier_frequencies(tmp_path):
    """--fp16 stores parameters in float16, buffers as they are; a 16-bit model keeps fp32 frequencies."""
    cfg = SONG_SMALL["ncsnpp"]
    sd = random_weights(edm_layout("song", **cfg), cfg["resample_filter"], seed=6)
    src = write_pickle(tmp_path / "ve.pkl", OrderedDict((f"model.{k}", v) for k, v in sd.items()),
                       network="SongUNet", network_kwargs=recorded_kwargs(cfg))
    result = CliRunner().invoke(restore_main, ["convert", str(src), str(tmp_path / "ve16.safetensors"),
                                               "--from", "edm-pkl", "--fp16"])
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "ve16.safetensors")["dtype"] == "float16,float32"
    half = load_model(tmp_path / "ve16.safetensors", dtype=torch.bfloat16)
    assert half.net.map_noise.freqs.dtype == torch.float32 and torch.equal(half.net.map_noise.freqs,
                                                                           sd["map_noise.freqs"])
    assert half.net.map_layer0.weight.dtype == torch.bfloat16
    full = read_edm_pkl(src)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 3.0])
    out, ref = half(x, sigma), full(x, sigma)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("method", ["ddnm", "dps"])
def test_converted_song_prior_runs_zero_shot_methods(method, tmp_path):
    import baselines  # noqa: F401 -- registers the methods
    from operators import build_operator
    from restore.methods import get_method

    cfg = dict(SONG_SMALL["ddpmpp"], img_resolution=32, label_dim=0)
    sd = random_weights(edm_layout("song", **cfg), (1, 1), seed=4)
    src = write_pickle(tmp_path / "edm-cifar10-32x32-uncond-vp.pkl", OrderedDict((f"model.{k}", v) for k, v in
                       sd.items()), network="SongUNet", network_kwargs=recorded_kwargs(cfg))
    model = load_model(convert_checkpoint(src, tmp_path / "prior.safetensors", "edm-pkl"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    op = build_operator("box:size=16")
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = get_method(method)(model, op(images), op, nfe=3, generator=gens)
    assert out.shape == images.shape and torch.isfinite(out).all()
    assert model.counter.forward >= 3


# --- full-size checks (slow: run with pytest -m slow) ----------------------------------------------------------------


def _full_size_check(tmp_path, arch: str, cfg: dict, kwargs: dict, labels):
    taps = (1, 1) if arch == "adm" else cfg["resample_filter"]
    sd = random_weights(edm_layout(arch, **cfg), taps, seed=5)
    name = "DhariwalUNet" if arch == "adm" else "SongUNet"
    src = write_pickle(tmp_path / "full.pkl", OrderedDict((f"model.{k}", v) for k, v in sd.items()), network=name,
                       network_kwargs=kwargs)
    model = load_model(convert_checkpoint(src, tmp_path / "full.safetensors", "edm-pkl"))
    res = cfg["img_resolution"]
    x, c_noise = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(0)), torch.tensor([-1.0, 0.7])
    onehot = None if labels is None else F.one_hot(labels, cfg["label_dim"])
    with torch.no_grad():
        ref = Direct(arch, sd, cfg)(x, c_noise, onehot)
        out = model.net(x, c_noise, class_labels=labels).double()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-5, err
    return model


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cifar10-ddpmpp", "cifar10-ncsnpp-cond"])
def test_full_size_cifar10_networks_convert_and_run(preset, tmp_path):
    """The released CIFAR-10 architectures at full size (55.7 M / 56.4 M parameters) through a pickle; the
    unconditional DDPM++ prior (edm-cifar10-32x32-uncond-vp.pkl's network) then runs DDNM."""
    from operators import build_operator
    from restore.methods import get_method

    cfg = SongUNetConfig.preset(preset).to_dict()
    labels = torch.tensor([3, 9]) if cfg["label_dim"] else None
    kwargs = recorded_kwargs(cfg)
    assert "num_blocks" not in kwargs and "attn_resolutions" not in kwargs  # EDM's defaults, as in the real files
    model = _full_size_check(tmp_path, "song", cfg, kwargs, labels)
    assert count_parameters(model.net) == (55_733_891 if preset == "cifar10-ddpmpp" else 56_400_643)
    if labels is None:
        import baselines  # noqa: F401 -- registers the methods

        op = build_operator("box:size=16")
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        out = get_method("ddnm")(model, op(images), op, nfe=2, generator=[torch.Generator().manual_seed(i)
                                                                           for i in range(2)])
        assert out.shape == images.shape and torch.isfinite(out).all()


@pytest.mark.slow
def test_full_size_imagenet64_matches_the_official_equations(tmp_path):
    """edm-imagenet-64x64-cond-adm.pkl's network at full size (295,899,267 parameters) through a pickle."""
    kwargs = {k: v for k, v in ADM_IMAGENET.items() if k not in ("num_blocks", "attn_resolutions")}
    model = _full_size_check(tmp_path, "adm", ADM_IMAGENET, kwargs, torch.tensor([1, 999]))
    assert count_parameters(model.net) == 295_899_267
