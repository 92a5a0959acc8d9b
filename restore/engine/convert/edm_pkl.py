"""``edm-pkl``: NVlabs/edm network pickles (Karras et al. 2022), read without executing anything from them.

The files (``edm-imagenet-64x64-cond-adm.pkl``, ``edm-cifar10-32x32-{cond,uncond}-{vp,ve}.pkl``,
``edm-{ffhq,afhqv2}-64x64-uncond-{vp,ve}.pkl``) are plain pickles of ``dict(ema=<EDMPrecond>, ...)`` whose modules are
``torch_utils.persistence`` objects: each reduces to ``_reconstruct_persistent_obj(meta)`` with the full source of
EDM's ``training/networks.py`` in ``meta`` and the module ``__dict__`` as ``meta["state"]``; the official loader
``exec``s that source. `read_edm_snapshot` instead unpickles with `SnapshotUnpickler`, whose ``find_class`` resolves
only `ALLOWED_GLOBALS`: the persistence function becomes `PersistentRecord` (class name, state, sha256 of the source;
the source is never run), ``torch.nn.ModuleDict`` / ``ModuleList`` a plain record, storages are read back with
``torch.load(weights_only=True)``. Any other global is refused with one line naming it.

The network is then rebuilt natively (docs/models.md#upstream-checkpoints): ``DhariwalUNet`` (ImageNet-64) as the ADM
`UNet` with scale-shift norm, plain attention, EDM's qkv order permuted and ``map_label`` transposed into
``label_emb``; ``SongUNet`` (DDPM++ / NCSN++) as `SongUNet` under EDM's own parameter names. Both are wrapped as
`EDMDenoiser` with ``noise_label="log4"`` (EDMPrecond's ``c_noise = ln(sigma) / 4``).
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from restore.engine.convert import register_converter
from restore.engine.convert.layout import qkv_rows_to_native
from restore.engine.networks import SongUNet, SongUNetConfig, UNet, UNetConfig
from restore.engine.networks.songunet import group_count
from restore.engine.wrappers import SIGMA_MAX, SIGMA_MIN, EDMDenoiser

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of every released EDM pickle


@dataclass
class PersistentRecord:
    """What `SnapshotUnpickler` makes of a ``torch_utils.persistence`` object: never the object itself."""

    class_name: str
    state: dict[str, Any]
    source_sha256: str


class ModuleRecord:
    """Stand-in for a plain ``torch.nn.ModuleDict`` / ``ModuleList`` (pickled as class + ``__dict__``)."""

    class_name = "ModuleDict"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("a pickled module container has a non-dict state")
        self.state = state


class ModuleListRecord(ModuleRecord):
    class_name = "ModuleList"


def _persistent_record(meta: Any) -> PersistentRecord:
    """Replaces ``torch_utils.persistence._reconstruct_persistent_obj``: keeps the data, never runs the source."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or meta.get("version") != PERSISTENCE_VERSION:
        kind = meta.get("type") if isinstance(meta, dict) else type(meta).__name__
        version = meta.get("version") if isinstance(meta, dict) else None
        raise pickle.UnpicklingError(f"unsupported persistent object (type={kind!r}, version={version!r}); "
                                     f"expected type 'class', version {PERSISTENCE_VERSION}")
    src, name, state = meta.get("module_src"), meta.get("class_name"), meta.get("state")
    if not isinstance(src, str) or not isinstance(name, str) or not isinstance(state, dict | None):
        raise pickle.UnpicklingError("malformed persistent object metadata")
    return PersistentRecord(name, state or {}, hashlib.sha256(src.encode()).hexdigest())


def _storage_from_bytes(data: Any):
    """Replaces ``torch.storage._load_from_bytes``: each blob is a legacy ``torch.save`` of one storage."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a storage blob is not bytes")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> torch.Tensor:
    """Replaces ``torch._utils._rebuild_parameter``: the tensor itself (hooks dropped)."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a pickled parameter does not hold a tensor")
    return data


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


# Every global a network snapshot references (reference: a real official pickle), and what it resolves to.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch.nn.modules.container", "ModuleDict"): ModuleRecord,
    ("torch.nn.modules.container", "ModuleList"): ModuleListRecord,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy._core.multiarray", "scalar"): _numpy_scalar(),
}


class SnapshotUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `ALLOWED_GLOBALS` and no persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}: not on the EDM network-snapshot "
                                         "allow-list") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent id: EDM network snapshots use none")


@dataclass
class EDMSnapshot:
    """An EDM network snapshot's contents: preconditioning class and settings, network class and state dict."""

    precond: str  # EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond
    precond_kwargs: dict[str, Any]
    attributes: dict[str, Any]  # plain attributes of the preconditioning object (sigma_data, sigma_min, ...)
    network: str  # DhariwalUNet or SongUNet
    network_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]  # ema.state_dict(): keys "model.<...>"
    source_sha256: str = ""
    extra_keys: list[str] = field(default_factory=list)  # other entries of the pickled dict (loss_fn, ...)


def _plain(value: Any) -> Any:
    """numpy scalars to Python numbers, tuples to lists, recursively (init kwargs are then JSON-ready)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _flatten(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """``state_dict()`` of a recorded module tree: own parameters, persistent buffers, then children, in order."""
    state = node.state
    hidden = set(state.get("_non_persistent_buffers_set") or ())
    tensors = [*(state.get("_parameters") or {}).items(),
               *((k, v) for k, v in (state.get("_buffers") or {}).items() if k not in hidden)]
    for name, t in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{prefix}{name} is a {type(t).__name__}, not a tensor")
        out[prefix + name] = t.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord | ModuleRecord):
            raise ValueError(f"module {prefix}{name} is a {type(child).__name__}, not a recorded module")
        _flatten(child, f"{prefix}{name}.", out)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_edm_snapshot(src: str | Path, key: str = "ema") -> EDMSnapshot:
    """The network snapshot ``key`` of an EDM pickle, read with `SnapshotUnpickler` (nothing from it is executed).

    ValueError (one line) for a refused global, a truncated or corrupt file, or a file of another layout.
    """
    path = Path(src)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        with open(path, "rb") as f:
            data = SnapshotUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("refusing"):
            raise ValueError(f"refusing to load {path}: {_one_line(e)}; nothing from it was executed") from None
        raise ValueError(f"{path} is not a readable EDM network pickle: {_one_line(e)}") from None
    except Exception as e:  # whatever a truncated or corrupt stream makes the unpickler raise: one line
        raise ValueError(f"{path} is not a readable EDM network pickle (truncated or corrupt?): "
                         f"{type(e).__name__}: {_one_line(e)}") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), PersistentRecord):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not an EDM network pickle: expected a dict with a persistent {key!r} network, "
                         f"found {found}")
    try:
        return _snapshot(data, key)
    except (AttributeError, TypeError, RecursionError) as e:  # records whose states are not module states
        raise ValueError(f"{path} is not an EDM network pickle: malformed module state "
                         f"({type(e).__name__}: {_one_line(e)})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {_one_line(e)}") from None


def _snapshot(data: dict, key: str) -> EDMSnapshot:
    ema = data[key]
    model = (ema.state.get("_modules") or {}).get("model")
    if not isinstance(model, PersistentRecord):
        raise ValueError(f"the {ema.class_name} in {key!r} has no persistent 'model' network")
    sd: dict[str, torch.Tensor] = {}
    _flatten(ema, "", sd)
    skip = {"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_init_args",
            "_init_kwargs"}
    attributes = {k: _plain(v) for k, v in ema.state.items()
                  if k not in skip and not k.endswith("hooks") and not k.startswith("_")}
    return EDMSnapshot(
        precond=ema.class_name, precond_kwargs=_plain(ema.state.get("_init_kwargs") or {}), attributes=attributes,
        network=model.class_name, network_kwargs=_plain(model.state.get("_init_kwargs") or {}), state_dict=sd,
        source_sha256=ema.source_sha256, extra_keys=sorted(str(k) for k in data if k != key),
    )


# --- DhariwalUNet -> ADM UNet -------------------------------------------------------------------------------------

# Inside an EDM UNetBlock -> (position in the ADM EmbedSequential, ADM name); attention parts go to the next position.
_BLOCK_RENAMES = {"norm0": (0, "in_layers.0"), "conv0": (0, "in_layers.2"), "affine": (0, "emb_layers.1"),
                  "norm1": (0, "out_layers.0"), "conv1": (0, "out_layers.3"), "skip": (0, "skip_connection"),
                  "norm2": (1, "norm"), "qkv": (1, "qkv"), "proj": (1, "proj_out")}
_BOX_FILTER = torch.full((1, 1, 2, 2), 0.25)


def dhariwal_config(sd: dict[str, torch.Tensor], kwargs: dict[str, Any], *,
                    num_head_channels: int = 64) -> UNetConfig:
    """The ADM `UNetConfig` of a DhariwalUNet state dict (keys without ``model.``), read off the keys; the init kwargs
    (only those passed explicitly are recorded) give the resolution and dropout and are cross-checked."""
    try:
        stem_key = next(k for k in sd if re.fullmatch(r"enc\.\d+x\d+_conv\.weight", k))
    except StopIteration:
        raise ValueError("not a DhariwalUNet state dict: no enc.<r>x<r>_conv.weight") from None
    res0 = int(stem_key.split(".")[1].split("x")[0])
    resolution = int(kwargs.get("img_resolution", res0))
    if resolution != res0:
        raise ValueError(f"img_resolution {resolution} disagrees with the stem enc.{res0}x{res0}_conv")
    mc = int(kwargs.get("model_channels", sd["map_layer0.weight"].shape[1]))  # the noise embedding is mc wide
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"enc\.(\d+)x\d+_", k))}, reverse=True)
    mult, attn = [], []
    nb = len({k.split(".")[1] for k in sd if re.match(rf"enc\.{res0}x{res0}_block\d+\.", k)})
    for r in levels:
        mult.append(sd[f"enc.{r}x{r}_block0.conv1.weight"].shape[0] // mc)
        if f"enc.{r}x{r}_block0.qkv.weight" in sd:
            attn.append(r)
    emb = sd["map_layer0.weight"].shape[0]
    if emb != 4 * mc:
        raise ValueError(f"embedding width {emb} is not 4 x model_channels ({mc}); the ADM UNet needs "
                         "channel_mult_emb 4")
    if "channel_mult" in kwargs and list(kwargs["channel_mult"]) != mult:
        raise ValueError(f"channel_mult {kwargs['channel_mult']} disagrees with the weights ({mult})")
    widths = [mc * m for m in mult]
    if any(group_count(w) != 32 for w in widths):
        raise ValueError(f"widths {widths}: EDM uses fewer than 32 GroupNorm groups below 128 channels; "
                         "the ADM UNet always uses 32")
    dropout = float(kwargs.get("dropout", 0.10))
    return UNetConfig(
        img_resolution=resolution, model_channels=mc, channel_mult=tuple(mult), num_res_blocks=nb,
        attention_resolutions=tuple(attn), in_channels=sd[stem_key].shape[1],
        out_channels=sd["out_conv.weight"].shape[0],
        num_head_channels=num_head_channels, dropout=dropout, dropout_lowres=None,
        num_classes=sd["map_label.weight"].shape[1] if "map_label.weight" in sd else 0,
        resblock_updown=True, qkv_norm=False, scale_shift_norm=True,
    )


def dhariwal_to_adm(sd: dict[str, torch.Tensor], num_head_channels: int = 64) -> dict[str, torch.Tensor]:
    """EDM DhariwalUNet keys (without ``model.``) -> the package's ADM UNet keys (docs/models.md#upstream-checkpoints).

    Encoder entries in order become ``input_blocks.<k>``, ``dec.*_in0`` / ``_in1`` the middle block, decoder blocks
    ``output_blocks.<j>`` with each ``_up`` appended to the preceding output block; qkv rows go from EDM's
    (heads, head_dim, three) to (three, heads, head_dim); ``map_label.weight`` is transposed into ``label_emb``; the
    constant resampling filters (2x2 box = average pooling / nearest upsampling) are checked and dropped, as is
    ``map_augment`` (used only with augmentation labels, never at sampling).
    """
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    order: list[str] = []
    for key, t in sd.items():
        parts = key.split(".")
        if parts[0] in ("enc", "dec"):
            block = f"{parts[0]}.{parts[1]}"
            if block not in blocks:
                order.append(block)
            blocks[block][".".join(parts[2:])] = t
        elif parts[0] in ("map_layer0", "map_layer1"):
            out[f"time_embed.{0 if parts[0] == 'map_layer0' else 2}.{parts[1]}"] = t
        elif key == "map_label.weight":
            out["label_emb.weight"] = t.t().contiguous()
        elif parts[0] in ("out_norm", "out_conv"):
            out[f"out.{0 if parts[0] == 'out_norm' else 2}.{parts[1]}"] = t
        elif parts[0] != "map_augment":
            raise ValueError(f"unexpected DhariwalUNet key {key!r}")

    def put(prefix: str, tensors: dict[str, torch.Tensor], base: int) -> int:
        """Write one EDM block at ADM position ``base`` (attention at base + 1); returns the next free position."""
        attends = "qkv.weight" in tensors
        for name, t in tensors.items():
            layer, param = name.rsplit(".", 1)
            if param == "resample_filter":
                if t.shape != _BOX_FILTER.shape or not (t.is_meta or torch.allclose(t.float(), _BOX_FILTER)):
                    raise ValueError(f"{prefix}: resample filter {t.flatten().tolist()} is not the 2x2 box of ADM")
                continue
            offset, adm = _BLOCK_RENAMES.get(layer, (0, None))
            if adm is None:
                raise ValueError(f"unexpected DhariwalUNet block entry {prefix}.{name}")
            if layer == "qkv":
                t = qkv_rows_to_native(t, t.shape[0] // 3 // num_head_channels, "heads-dim-three")
            out[f"{prefix}.{base + offset}.{adm}.{param}"] = t
        return base + (2 if attends else 1)

    k = j = 0
    next_pos = 0  # next free position in output block j - 1 (for its upsampler)
    for block in order:
        side, name = block.split(".")
        tensors = blocks[block]
        if side == "enc":
            if name.endswith("_conv"):
                out["input_blocks.0.0.weight"], out["input_blocks.0.0.bias"] = tensors["weight"], tensors["bias"]
            else:
                put(f"input_blocks.{k}", tensors, 0)
            k += 1
        elif name.endswith("_in0"):
            put("middle_block", tensors, 0)
        elif name.endswith("_in1"):
            put("middle_block", tensors, 2)
        elif name.endswith("_up"):
            if j == 0:
                raise ValueError(f"{block} comes before any decoder block")
            put(f"output_blocks.{j - 1}", tensors, next_pos)
        else:
            next_pos = put(f"output_blocks.{j}", tensors, 0)
            j += 1
    return out


# --- the converter ------------------------------------------------------------------------------------------------

_SONG_IGNORED = {"label_dropout"}  # training-only arguments of EDM's SongUNet


def song_config(kwargs: dict[str, Any]) -> SongUNetConfig:
    """`SongUNetConfig` from a SongUNet's recorded init kwargs; the arguments not recorded keep EDM's defaults,
    which are this config's defaults (the strict state-dict load then checks the whole architecture)."""
    fields = set(SongUNetConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - fields - _SONG_IGNORED)
    if unknown:
        raise ValueError(f"SongUNet init arguments {unknown} are not supported")
    return SongUNetConfig.from_dict({k: v for k, v in kwargs.items() if k in fields})


def network_from_snapshot(snap: EDMSnapshot, *, num_head_channels: int = 64) -> nn.Module:
    """The snapshot's network as this package's backbone, weights loaded with ``strict=True``."""
    sd = {k.removeprefix("model."): v for k, v in snap.state_dict.items() if k.startswith("model.")}
    others = sorted(k for k in snap.state_dict if not k.startswith("model."))
    if others:
        raise ValueError(f"unexpected tensors outside the network: {others[:3]}")
    if snap.network == "DhariwalUNet":
        config = dhariwal_config(sd, snap.network_kwargs, num_head_channels=num_head_channels)
        sd = dhariwal_to_adm(sd, num_head_channels)
        cls: type[nn.Module] = UNet
    elif snap.network == "SongUNet":
        config, cls = song_config(snap.network_kwargs), SongUNet
    else:
        raise ValueError(f"unsupported EDM network class {snap.network!r}; supported: DhariwalUNet, SongUNet")
    with torch.device("meta"):
        net = cls(config)
    try:
        net.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"the {snap.network} weights do not match {config}: {_one_line(e)}") from None
    return net.eval()


def read_edm_pkl(src: str | Path, *, wrapper: str | None = None, img_resolution: int | None = None,
                 num_head_channels: int = 64, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> nn.Module:
    """The EDMDenoiser (``noise_label="log4"``) of an EDM network pickle ``src``.

    Architecture, resolution, classes and sigma_data come from the pickle; ``img_resolution`` (optional) is only
    cross-checked. Not in the pickle: the head width of DhariwalUNet (hard-coded 64 in EDM's source; option) and the
    sampling range, since EDMPrecond has sigma_min 0 and sigma_max inf (defaults 0.002 / 80, EDM's sampler).
    Only EDMPrecond snapshots (all released ``edm-*`` files) are accepted.
    """
    if wrapper not in (None, "edm"):
        raise ValueError(f"EDM pickles convert to the 'edm' wrapper only, not {wrapper!r}")
    snap = read_edm_snapshot(src)
    if snap.precond != "EDMPrecond":
        raise ValueError(f"{Path(src).name} uses {snap.precond}; only EDMPrecond snapshots (the released edm-* "
                         "pickles) are supported, not the VP/VE/iDDPM baselines")
    found = snap.network_kwargs.get("img_resolution", snap.precond_kwargs.get("img_resolution"))
    if img_resolution is not None and found is not None and int(found) != img_resolution:
        raise ValueError(f"--resolution {img_resolution} disagrees with the pickle's img_resolution {found}")
    net = network_from_snapshot(snap, num_head_channels=num_head_channels)
    sigma_data = float(snap.attributes.get("sigma_data", 0.5))
    return EDMDenoiser(net, sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max, noise_label="log4").eval()


register_converter("edm-pkl", read_edm_pkl,
                   "NVlabs/edm network pickles (EDMPrecond: DhariwalUNet ImageNet-64, SongUNet CIFAR-10/FFHQ/AFHQv2)")

__all__ = ["ALLOWED_GLOBALS", "EDMSnapshot", "ModuleRecord", "PersistentRecord", "SnapshotUnpickler",
           "dhariwal_config", "dhariwal_to_adm", "network_from_snapshot", "read_edm_pkl", "read_edm_snapshot",
           "song_config"]
