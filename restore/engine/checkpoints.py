"""Model checkpoints: safetensors weights + JSON metadata, bundled models, safe loading of upstream files.

File format ``bcm-restore/1``: a safetensors file holding the UNet state dict (official ADM/BCM key
names, docs/models.md#upstream-checkpoints) and string metadata

    format   "bcm-restore/1"
    wrapper  registered wrapper name ("edm", "cm", "bcm", ...), see `register_wrapper`
    network  registered backbone name (`restore.engine.networks.NETWORKS`); absent in older files: "adm"
    unet     JSON of the backbone's config (`UNetConfig` for "adm")
    sigma_min, sigma_max, sigma_data   the wrapper's noise-level constants
    dtype    storage dtype of the floating-point tensors ("float32", "float16", ...)
    card     optional JSON model card (free-form dict: data, training, metrics, licence)
    wrapper_config   optional JSON of ``model.wrapper_config()`` when not empty (settings beyond the sigmas, e.g. the
                     operator a conditional baseline was trained for, a non-default noise label); passed back as
                     keyword arguments

Nothing is ever unpickled as is: safetensors files are read with ``safetensors.torch.load_file``,
upstream ``.pt`` files with ``torch.load(weights_only=True)`` (`load_state_dict_file`) and NVlabs EDM ``.pkl``
network pickles with the allow-list unpickler of `restore.engine.convert.edm_pkl`, which runs nothing from the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from restore.engine.networks import build_network, network_name
from restore.engine.wrappers import get_wrapper, wrapper_name
from restore.runtime.files import atomic_path

FORMAT = "bcm-restore/1"
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"

@dataclass(frozen=True)
class BundledModel:
    """A checkpoint shipped in ``restore/weights/``."""

    filename: str
    description: str
    purpose: str


# Checkpoints shipped with the package, by name (`load_model(name)`, `restore models`).
# To add one: put ``<file>.safetensors`` (written by `save_model`, with a card) in restore/weights/
# and add an entry here; see restore/weights/README.md.
_CAMPAIGN = "cifar-tiny UNet, CIFAR-10 32x32; campaign budget 5e5 GFLOP (docs/results/campaign)"
BUNDLED_MODELS: dict[str, BundledModel] = {
    "bcm-cifar10": BundledModel("bcm-cifar10.safetensors", f"BCM (BCD from edm-cifar10), 0.81 M params, {_CAMPAIGN}",
                                "BCM restoration, 1-4 step sampling, inversion"),
    "edm-cifar10": BundledModel("edm-cifar10.safetensors", f"EDM denoiser, 0.76 M params, {_CAMPAIGN}",
                                "diffusion prior for BDIA/EDICT, DPS, PiGDM, DDRM, DDNM"),
}
# The trained conditional baselines, one per operator, on bcm-cifar10's compute (restore.records.fairness).
BUNDLED_MODELS.update({
    f"{family}-cifar10-{tag}": BundledModel(f"{family}-cifar10-{tag}.safetensors", f"{what} for {spec}, {_CAMPAIGN}",
                                            f"the {family} baseline on {spec}")
    for family, what in (("palette", "Palette (conditional EDM denoiser)"), ("i2sb", "I2SB (Schrödinger bridge)"))
    for tag, spec in (("jpeg10", "jpeg:quality=10"), ("box16", "box:size=16"), ("sr2", "down:factor=2,kernel=bicubic"))
})


def list_models() -> list[dict[str, Any]]:
    """Bundled models: name, file, description, purpose, whether the file is present, and its model card."""
    rows = []
    for name, m in sorted(BUNDLED_MODELS.items()):
        available = (WEIGHTS_DIR / m.filename).is_file()
        card = read_metadata(WEIGHTS_DIR / m.filename).get("card") if available else None
        rows.append({"name": name, "filename": m.filename, "description": m.description, "purpose": m.purpose,
                     "available": available, "card": card})
    return rows


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A checkpoint path from a file path or a bundled model name; ValueError listing the names otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if str(name_or_path) in BUNDLED_MODELS:
        bundled = WEIGHTS_DIR / BUNDLED_MODELS[str(name_or_path)].filename
        if not bundled.is_file():
            raise ValueError(f"bundled model {name_or_path!r} is listed but its file {bundled} is missing")
        return bundled
    known = ", ".join(sorted(BUNDLED_MODELS)) or "(none bundled)"
    raise ValueError(f"{str(name_or_path)!r} is neither a checkpoint file nor a bundled model; bundled models: {known}")


def save_model(model: nn.Module, path: str | Path, *, dtype: torch.dtype | None = None,
               card: dict[str, Any] | None = None) -> Path:
    """Write a registered wrapper (its ``.net`` backbone and sigma constants) as a ``bcm-restore/1`` safetensors file.

    ``dtype`` (e.g. ``torch.float16``) converts floating-point parameters for storage; buffers keep their dtype
    (constants whose precision matters, such as the random Fourier frequencies of an NCSN++ `SongUNet`). `load_model`
    converts back to the requested dtype. ``card`` is an optional JSON-serialisable model card.
    """
    name = wrapper_name(model)
    net = model.net
    network = network_name(net)
    buffers = {key for key, _ in net.named_buffers()}
    tensors = {}
    for key, t in net.state_dict().items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point() and key not in buffers:
            t = t.to(dtype)
        tensors[key] = t.contiguous()  # channels_last parameters are stored in standard layout
    stored = {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
    metadata = {
        "format": FORMAT,
        "wrapper": name,
        "network": network,
        "unet": json.dumps(net.config.to_dict()),
        "sigma_min": repr(float(model.sigma_min)),
        "sigma_max": repr(float(model.sigma_max)),
        "sigma_data": repr(float(model.sigma_data)),
        "dtype": ",".join(sorted(stored)),
    }
    settings = model.wrapper_config() if hasattr(model, "wrapper_config") else {}
    if settings:
        metadata["wrapper_config"] = json.dumps(settings)
    if card is not None:
        metadata["card"] = json.dumps(card)
    with atomic_path(path) as tmp:  # a crash never leaves a truncated checkpoint
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


@contextlib.contextmanager
def _readable(path: Path):
    """Turn the reader's errors on a truncated or corrupt file into one line naming the file."""
    try:
        yield
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt?): {first}") from None


def read_metadata(name_or_path: str | Path) -> dict[str, Any]:
    """Decoded metadata of a checkpoint (no tensors read): wrapper, network, unet (dict), sigma_*, dtype, card,
    wrapper_config (dict, empty for wrappers without settings of their own)."""
    path = resolve_model_path(name_or_path)
    with _readable(path), safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint (format={raw.get('format')!r}); "
                         "convert upstream checkpoints with `restore convert`")
    meta: dict[str, Any] = {"format": FORMAT, "wrapper": raw["wrapper"], "network": raw.get("network", "adm"),
                            "unet": json.loads(raw["unet"]),
                            "dtype": raw.get("dtype", "")}
    for key in ("sigma_min", "sigma_max", "sigma_data"):
        meta[key] = float(raw[key])
    meta["card"] = json.loads(raw["card"]) if "card" in raw else None
    meta["wrapper_config"] = json.loads(raw.get("wrapper_config", "{}"))
    return meta


def weights_sha256(name_or_path: str | Path) -> str:
    """sha256 of what determines a checkpoint's outputs: its tensors and metadata without the model card, so that
    editing a card (metrics, notes) keeps results computed with the checkpoint valid."""
    path = resolve_model_path(name_or_path)
    with _readable(path), open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))  # safetensors: u64 length, JSON header
        header.get("__metadata__", {}).pop("card", None)
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a ``bcm-restore/1`` checkpoint (path or bundled name) as its registered wrapper, in eval mode.

    The backbone is built on the meta device and takes the file's tensors directly (no double allocation);
    keys must match exactly. The model card, if any, is attached as ``model.card``.
    """
    path = resolve_model_path(name_or_path)
    meta = read_metadata(path)
    cls = get_wrapper(meta["wrapper"])
    with torch.device("meta"):
        net = build_network(meta["network"], meta["unet"])
    with _readable(path):
        tensors = load_file(str(path), device=str(torch.device(device)))
    net.load_state_dict(tensors, strict=True, assign=True)
    net = net.to(dtype=dtype)
    model = cls(net, sigma_min=meta["sigma_min"], sigma_max=meta["sigma_max"], sigma_data=meta["sigma_data"],
                **meta["wrapper_config"])
    model.card = meta["card"]
    return model.eval()


def load_torch_file(path: str | Path) -> Any:
    """The plain content (tensors, containers, numbers, strings) of an untrusted ``torch.save`` file, read with
    ``torch.load(weights_only=True)``, which refuses any other pickled object. Refusals and truncated or corrupt
    files are one-line ValueErrors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:  # not a refused object: a damaged pickle stream
            inner = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            reason = inner.group(1) if inner else (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {reason}") from None
        what = f" (found {found.group(1)})"
        raise ValueError(f"refusing to load {path}: it holds pickled objects other than tensors and plain "
                         f"containers{what}; this tool never unpickles code") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {first}") from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict from an untrusted ``.pt``/``.pth`` (or ``.safetensors``) file.

    ``.pt`` files go through `load_torch_file` (``torch.load(weights_only=True)``, which refuses arbitrary pickled
    objects); the result must be a mapping of names to tensors (the official BCM/iCT format,
    docs/models.md#upstream-checkpoints).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        with _readable(path):
            return load_file(str(path))
    obj = load_torch_file(path)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path} is not a flat state dict of tensors (got {type(obj).__name__}); "
                         "expected the official un-prefixed UNet state dict")
    return obj
