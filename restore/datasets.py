"""Benchmark datasets: indexable image sets with stable string ids.

Every dataset is a sequence of ``(image_id, image)`` with ``image`` float32 (3, H, W) in [-1, 1]
(``restore.app.io``'s conversion rule for files), plus ``ids``, ``labels`` (0-based, or ``None``),
``classes`` and :meth:`Dataset.get_batch` / :meth:`Dataset.batches` to build (B, 3, H, W) batches
(one fancy-indexing for arrays). Ids never depend on how a dataset is loaded: CIFAR-10 from the npz
in ``../shared/data`` and from the official python batches give the same ``cifar10-test-00042``.

Sources (:func:`build_dataset`):

* ``cifar10`` (split ``train`` / ``test``): ``cifar10_{split}.npz`` (``x`` uint8 NHWC, ``y``,
  ``filenames``); ids ``cifar10-{split}-{index:05d}``.
* ``tinyimagenet`` (split ``val``): ``tinyimagenet200_val_jpeg.npz`` (``jpeg`` concatenated JPEG
  files, image i is ``jpeg[offsets[i]:offsets[i+1]]``, ``y``, ``wnids``), decoded on access (grey
  JPEGs become RGB); ids ``tinyimagenet-val-{index:05d}``. ``y`` indexes the file's 200 ``wnids``; the
  labels are their **ImageNet-1k** class indices (:func:`imagenet_class_index`), the ones ImageNet-64
  ADM / EDM / CM / BCM checkpoints are conditioned on, and ``classes`` is the 1000 ImageNet-1k wnids.
* a folder of images (``restore.app.io.ImageFolder``; ids are relative paths such as ``sub/cat.png``),
  labelled when it holds ``labels.csv`` (columns ``file,label``; ``restore.app.io.read_labels``): every
  image must then have a label;
* a CIFAR-10 python folder (``cifar-10-batches-py``: ``data_batch_1..5``, ``test_batch``,
  ``batches.meta``) or one batch file. These are pickles; they are read by :func:`restricted_unpickle`,
  which builds only containers, numbers, strings and numeric numpy arrays and refuses every other
  global, so a crafted file cannot run code;
* an ``.npz`` file: ``x`` (+ ``y``) uint8 images NHWC or NCHW (ids ``<file stem>-{index}``),
  JPEG bytes with ``jpeg``/``offsets`` as above, or downsampled ImageNet (Imagenet32/64 format:
  ``data`` uint8 (N, 3*H*W) flattened channel-first, ``labels`` 1-based in the ILSVRC devkit order; ids
  ``imagenet{H}-<file stem>-{index}``; labels become ImageNet-1k indices when the devkit's ``map_clsloc.txt``
  lies next to the file, else devkit numbers - 1, with a warning: :func:`load_downsampled_imagenet`).

Labels are 0-based class indices (``Dataset.labels``, ``Dataset.batch_labels``), the ``class_labels`` that
class-conditional models take (docs/design.md#class-labels).

Named datasets are looked up in ``root``, else ``$BCM_RESTORE_DATA``, else ``../shared/data`` next
to the repository (:func:`data_root`).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import pickle
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from operators.utils import from_uint8
from restore.app.io import (
    LABELS_FILE,
    ErrorCallback,
    ImageFolder,
    ImageReadError,
    group_by_size,
    image_size,
    read_image_uint8,
)

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "ArrayDataset",
    "Dataset",
    "FolderDataset",
    "JpegBytesDataset",
    "build_dataset",
    "data_root",
    "imagenet_class_index",
    "imagenet_wnids",
    "load_cifar10_python",
    "load_downsampled_imagenet",
    "load_npz",
    "read_class_map",
    "restricted_unpickle",
]

logger = logging.getLogger(__name__)

CLASS_MAP_FILE = "map_clsloc.txt"  # ILSVRC devkit class numbers of downsampled ImageNet (load_downsampled_imagenet)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# name -> (file pattern in the data root, splits, default split, description)
DATASETS = {
    "cifar10": ("cifar10_{split}.npz", ("train", "test"), "test", "CIFAR-10, 32x32, 10 classes, lossless"),
    "tinyimagenet": ("tinyimagenet200_val_jpeg.npz", ("val",), "val",
                     "Tiny-ImageNet-200 validation, 64x64, 200 classes, already JPEG-compressed"),
}


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k (ILSVRC2012) class wnids in sorted order, ``n01440764`` ... ``n15075141``: position
    = the class index of the ADM / EDM / consistency-model ImageNet checkpoints (the sorted synset folders of the
    training set). Stored in the package, ``restore/data/imagenet1k_wnids.txt``."""
    text = (Path(__file__).resolve().parent / "data" / "imagenet1k_wnids.txt").read_text()
    wnids = tuple(text.split())
    if len(wnids) != 1000 or list(wnids) != sorted(set(wnids)):
        raise ValueError("restore/data/imagenet1k_wnids.txt is corrupt: expected 1000 sorted, distinct wnids")
    return wnids


def imagenet_class_index(wnids: Sequence[str]) -> np.ndarray:
    """ImageNet-1k class indices (int64) of ``wnids``; ValueError naming those that are not ImageNet-1k classes."""
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    unknown = [str(w) for w in wnids if str(w) not in index]
    if unknown:
        raise ValueError(f"not ImageNet-1k classes: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return np.array([index[str(w)] for w in wnids], dtype=np.int64)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$BCM_RESTORE_DATA``, else ``../shared/data`` next to the repository."""
    if root is not None:
        return Path(root)
    if os.environ.get("BCM_RESTORE_DATA"):
        return Path(os.environ["BCM_RESTORE_DATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- datasets


class Dataset(torch.utils.data.Dataset, ABC):
    """Images with stable string ids; ``ds[i] -> (id, (3, H, W) float32 in [-1, 1])``."""

    name: str
    source: str
    labels: np.ndarray | None = None
    classes: tuple[str, ...] | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def image_id(self, index: int) -> str:
        """Id of image ``index`` (already range-checked)."""

    @abstractmethod
    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of image ``index``."""

    @abstractmethod
    def _uint8(self, indices: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) uint8 for valid indices of images of one size."""

    @property
    def ids(self) -> list[str]:
        return [self.image_id(i) for i in range(len(self))]

    def batch_labels(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The class labels of images ``indices`` as an int64 (B,) tensor, the ``class_labels`` of the method
        contract; ValueError when the dataset has none."""
        if self.labels is None:
            raise ValueError(f"dataset {self.name!r} has no class labels (a folder needs {LABELS_FILE} with columns "
                             "file,label)")
        return torch.from_numpy(np.asarray(self.labels)[self._check(indices)])

    def index(self, image_id: str) -> int:
        """Position of ``image_id``; ``KeyError`` if absent."""
        if not hasattr(self, "_index"):
            self._index = {name: i for i, name in enumerate(self.ids)}
        return self._index[image_id]

    def _check(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if ((idx < -n) | (idx >= n)).any():
            raise IndexError(f"index out of range for {self.name} with {n} images")
        return idx % n if n else idx

    def uint8(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(B, 3, H, W) uint8 of images of one size."""
        idx = self._check(indices)
        sizes = {self.image_size(int(i)) for i in idx}
        if len(sizes) > 1:
            raise ValueError(f"images of different sizes {sorted(sizes)} cannot form one batch; use batches()")
        return self._uint8(idx)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[list[str], torch.Tensor]:
        """``(ids, x)`` with ``x`` float32 (B, 3, H, W) in [-1, 1]; the images must share one size."""
        idx = self._check(indices)
        sizes = {self.image_size(int(i)) for i in idx}
        if len(sizes) > 1:
            raise ValueError(f"images of different sizes {sorted(sizes)} cannot form one batch; use batches()")
        x = self._uint8(idx) if len(idx) else np.zeros((0, 3, 0, 0), np.uint8)
        return [self.image_id(int(i)) for i in idx], from_uint8(torch.from_numpy(np.ascontiguousarray(x)))

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        ids, x = self.get_batch([index])
        return ids[0], x[0]

    def batches(self, batch_size: int,
                indices: Sequence[int] | None = None) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Batches of equal-size images over ``indices`` (default all), grouped as in ``restore.app.io``."""
        idx = self._check(range(len(self)) if indices is None else indices)
        for group in group_by_size([self.image_size(int(i)) for i in idx], batch_size):
            yield self.get_batch(idx[group])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, images={len(self)}, source={self.source!r})"


class ArrayDataset(Dataset):
    """uint8 images held in memory, ``layout`` ``"NHWC"`` or ``"NCHW"``; ids ``{name}-{offset + i:05d}``."""

    def __init__(
        self,
        images: np.ndarray,
        name: str,
        layout: str = "NHWC",
        labels: np.ndarray | None = None,
        classes: Sequence[str] | None = None,
        source: str = "",
        offset: int = 0,
        filenames: Sequence[str] | None = None,
    ):
        if layout not in ("NHWC", "NCHW"):
            raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
        channels = (images.shape[3] if layout == "NHWC" and images.ndim == 4
                    else images.shape[1] if images.ndim == 4 else None)
        if images.dtype != np.uint8 or channels != 3:
            raise ValueError(f"expected uint8 RGB images in {layout} layout, got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images, self.layout, self.name, self.source = images, layout, name, source
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.classes = None if classes is None else tuple(classes)
        self.filenames = None if filenames is None else list(filenames)
        self._offset = offset
        self._width = max(5, len(str(max(len(images) + offset - 1, 0))))

    def __len__(self) -> int:
        return len(self.images)

    def image_id(self, index: int) -> str:
        return f"{self.name}-{self._offset + index:0{self._width}d}"

    def image_size(self, index: int) -> tuple[int, int]:
        shape = self.images.shape
        return (shape[1], shape[2]) if self.layout == "NHWC" else (shape[2], shape[3])

    def _uint8(self, indices: np.ndarray) -> np.ndarray:
        x = self.images[indices]
        return x.transpose(0, 3, 1, 2) if self.layout == "NHWC" else x


class JpegBytesDataset(Dataset):
    """Encoded images stored back to back (``data[offsets[i]:offsets[i+1]]``), decoded on access."""

    def __init__(
        self,
        data: np.ndarray,
        offsets: np.ndarray,
        name: str,
        labels: np.ndarray | None = None,
        classes: Sequence[str] | None = None,
        source: str = "",
    ):
        offsets = np.asarray(offsets, dtype=np.int64)
        if (offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(data)
                or (np.diff(offsets) <= 0).any()):
            raise ValueError("offsets must start at 0, increase strictly and end at the data length")
        if labels is not None and len(labels) != len(offsets) - 1:
            raise ValueError(f"{len(labels)} labels for {len(offsets) - 1} images")
        self.data, self.offsets, self.name, self.source = data, offsets, name, source
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.classes = None if classes is None else tuple(classes)
        self._width = max(5, len(str(max(len(offsets) - 2, 0))))
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def image_id(self, index: int) -> str:
        return f"{self.name}-{index:0{self._width}d}"

    def _bytes(self, index: int) -> bytes:
        return self.data[self.offsets[index] : self.offsets[index + 1]].tobytes()

    def image_size(self, index: int) -> tuple[int, int]:
        if index not in self._sizes:
            self._sizes[index] = self._read(index, image_size)
        return self._sizes[index]

    def _read(self, index: int, reader):
        try:
            return reader(self._bytes(index))
        except ImageReadError as err:
            raise ImageReadError(self.image_id(index), err.reason) from err

    def _uint8(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self._read(int(i), read_image_uint8) for i in indices]).transpose(0, 3, 1, 2)


class FolderDataset(Dataset):
    """A folder of image files (``restore.app.io.ImageFolder``): ids are relative paths with extension.

    Unreadable files are reported to ``on_error`` when the folder is listed and left out; a file that
    passes the header check but fails to decode raises :class:`restore.app.io.ImageReadError` on access.
    """

    def __init__(self, root: str | os.PathLike, recursive: bool = False, on_error: ErrorCallback | None = None):
        self.folder = ImageFolder(root, recursive, on_error)
        self.name = self.folder.root.resolve().name
        self.source = str(self.folder.root)
        if self.folder.labels is not None:
            missing = [i for i in self.folder.ids if i not in self.folder.labels]
            if missing:
                raise ValueError(f"{self.folder.root / LABELS_FILE} has no label for {len(missing)} image(s), "
                                 f"e.g. {', '.join(missing[:3])}")
            self.labels = np.array([self.folder.labels[i] for i in self.folder.ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.folder)

    @property
    def ids(self) -> list[str]:
        return list(self.folder.ids)

    def image_id(self, index: int) -> str:
        return self.folder.ids[index]

    def image_size(self, index: int) -> tuple[int, int]:
        return self.folder.sizes[index]

    def _uint8(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([read_image_uint8(self.folder.paths[i]) for i in indices]).transpose(0, 3, 1, 2)


# --------------------------------------------------------------------------- safe pickle reading


class _Refused(pickle.UnpicklingError):
    pass


def _text(value) -> str:
    # Python 2 pickles read with encoding="bytes" give str values as bytes.
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


class _Dtype:
    """Stands in for ``numpy.dtype`` while unpickling; only plain numeric dtypes resolve."""

    def __init__(self, code, align=False, copy=False):
        self.code, self.byteorder = _text(code), "|"

    def __setstate__(self, state) -> None:
        # (version, byteorder, subarray, names, fields, ...): structured dtypes have code "V.." and fail resolve()
        self.byteorder = _text(tuple(state)[1])

    def resolve(self) -> np.dtype:
        if not re.fullmatch(r"[biuf]\d{1,2}", self.code) or self.byteorder not in ("<", ">", "|", "="):
            raise _Refused(f"refusing numpy dtype {self.byteorder}{self.code}: only numeric dtypes are allowed")
        return np.dtype(("" if self.byteorder in "|=" else self.byteorder) + self.code)


class _Array:
    """Stands in for an ``ndarray`` made by ``numpy.core.multiarray._reconstruct``; filled by BUILD."""

    array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        state = tuple(state)
        if len(state) == 5:
            state = state[1:]  # drop the pickle format version
        if len(state) != 4:
            raise _Refused("malformed numpy array state")
        shape, dtype, fortran, raw = state
        self.array = _build_array(raw, dtype, shape, "F" if fortran else "C")


_NDARRAY = object()  # what ``numpy.ndarray`` unpickles to: only accepted as _reconstruct's first argument


def _build_array(raw, dtype, shape, order) -> np.ndarray:
    if not isinstance(dtype, _Dtype):
        raise _Refused("numpy array without a numeric dtype")
    dt = dtype.resolve()
    raw = raw.encode("latin-1") if isinstance(raw, str) else raw
    if not isinstance(raw, (bytes, bytearray)) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _Refused("malformed numpy array data")
    if math.prod(shape) * dt.itemsize != len(raw):
        raise _Refused(f"numpy array data of {len(raw)} bytes does not fit shape {tuple(shape)} of {dt}")
    return np.frombuffer(raw, dt).reshape(tuple(shape), order=_text(order)).copy()


def _reconstruct(cls, shape, typecode) -> _Array:
    if cls is not _NDARRAY:
        raise _Refused("numpy _reconstruct of something other than an ndarray")
    return _Array()


def _latin1(text, encoding="latin-1") -> bytes:
    # Python 3 protocol-2 pickles write bytes as _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding.replace("_", "-").lower() not in ("latin1", "latin-1"):
        raise _Refused("only latin-1 encoding of text is allowed")
    return text.encode("latin-1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _build_array,
    ("numpy._core.numeric", "_frombuffer"): _build_array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _latin1,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"refusing to load {module}.{name}: a data pickle may only hold containers, numbers, "
                           "text and numeric numpy arrays") from None


def _finish(obj, memo: dict):
    """Replace the stand-ins by real arrays / dtypes, through dicts, lists and tuples (cycles kept)."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _Array):
        if obj.array is None:
            raise _Refused("numpy array without data")
        return obj.array
    if isinstance(obj, _Dtype):
        return obj.resolve()
    if isinstance(obj, dict):
        out = memo[id(obj)] = {}
        out.update((_finish(k, memo), _finish(v, memo)) for k, v in obj.items())
        return out
    if isinstance(obj, list):
        out = memo[id(obj)] = []
        out.extend(_finish(v, memo) for v in obj)
        return out
    if isinstance(obj, tuple):
        return tuple(_finish(v, memo) for v in obj)
    return obj


def restricted_unpickle(data: bytes):
    """Unpickle a *data* pickle without running code from it.

    Only dicts, lists, tuples, sets, numbers, text, bytes and numeric numpy arrays are built (the numpy
    globals are replaced by local stand-ins that validate dtype, shape and byte count); any other
    global, e.g. ``os.system``, raises ``pickle.UnpicklingError``. Python 2 pickles (the official
    CIFAR-10 batches) are read with ``encoding="bytes"``, so their text arrives as ``bytes``.
    """
    try:
        return _finish(_RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load(), {})
    except _Refused:
        raise
    except Exception as exc:
        raise pickle.UnpicklingError(f"not a readable data pickle: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- loaders


def _str_keys(d) -> dict:
    if not isinstance(d, dict):
        raise ValueError("expected a pickled dict")
    return {_text(k): v for k, v in d.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    batch = _str_keys(restricted_unpickle(path.read_bytes()))
    if "labels" not in batch:
        raise ValueError(f"{path}: no 'labels' in this batch (CIFAR-100 batches are not supported)")
    data, labels = batch.get("data"), np.asarray(batch["labels"], dtype=np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (len(labels), 3 * 32 * 32):
        raise ValueError(f"{path}: expected 'data' uint8 of shape ({len(labels)}, 3072)")
    names = [_text(n) if isinstance(n, bytes) else str(n) for n in batch.get("filenames", [])]
    return data.reshape(-1, 3, 32, 32), labels, names


def _cifar_classes(folder: Path) -> tuple[str, ...]:
    meta = folder / "batches.meta"
    if meta.is_file():
        names = _str_keys(restricted_unpickle(meta.read_bytes())).get("label_names")
        if names:
            return tuple(_text(n) for n in names)
    return CIFAR10_CLASSES


def load_cifar10_python(path: str | os.PathLike, split: str | None = None) -> ArrayDataset:
    """CIFAR-10 from the official python batches: a folder (``split`` ``test`` (default) or ``train``)
    or one batch file (``data_batch_k`` -> train images from ``(k-1) * 10000``, ``test_batch``)."""
    path = Path(path)
    first = 1  # number of the first batch file read
    if path.is_dir():
        split = split or "test"
        if split not in ("train", "test"):
            raise ValueError(f"unknown CIFAR-10 split {split!r}: valid choices are train, test")
        files = [path / "test_batch"] if split == "test" else [path / f"data_batch_{k}" for k in range(1, 6)]
        folder = path
    else:
        m = re.fullmatch(r"data_batch_(\d+)|test_batch", path.name)
        if m is None:
            raise ValueError(f"{path} is not a CIFAR-10 python batch (data_batch_1..5, test_batch)")
        found = "train" if m.group(1) else "test"
        if split not in (None, found):
            raise ValueError(f"{path.name} holds the {found} split, not {split!r}")
        split, files, folder, first = found, [path], path.parent, int(m.group(1) or 1)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"missing CIFAR-10 batch file(s): {', '.join(missing)}")
    parts = [_read_cifar_batch(f) for f in files]
    return ArrayDataset(
        np.concatenate([p[0] for p in parts]),
        f"cifar10-{split}",
        layout="NCHW",
        labels=np.concatenate([p[1] for p in parts]),
        classes=_cifar_classes(folder),
        source=str(path),
        offset=(first - 1) * len(parts[0][1]),
        filenames=[n for p in parts for n in p[2]] or None,
    )


def read_class_map(path: str | os.PathLike) -> dict[int, str]:
    """``{class number: wnid}`` from an ILSVRC devkit ``map_clsloc.txt`` (lines ``n02119789 1 kit_fox``)."""
    out = {}
    for k, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{k}: expected 'WNID NUMBER NAME', got {line!r}")
        out[int(parts[1])] = parts[0]
    return out


def load_downsampled_imagenet(path: str | os.PathLike) -> ArrayDataset:
    """Imagenet32/64-style npz: ``data`` uint8 (N, 3*H*W) flattened channel-first, ``labels`` 1-based.

    Those labels number the classes in the ILSVRC devkit order of ``map_clsloc.txt`` (1 = n02119789 kit fox), not
    in the sorted-wnid order of the ImageNet-1k checkpoints. With ``map_clsloc.txt`` next to the file they become
    ImageNet-1k indices (:func:`imagenet_class_index`; ``classes`` = :func:`imagenet_wnids`); without it they are
    the devkit numbers minus one (``classes`` None) and a warning says so, since a class-conditional ImageNet
    model would be conditioned on the wrong classes."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as f:
        data, labels = f["data"], np.asarray(f["labels"]).astype(np.int64)
    side = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
    if data.dtype != np.uint8 or side == 0 or 3 * side * side != data.shape[1]:
        raise ValueError(f"{path}: expected 'data' uint8 of shape (N, 3*H*H), got {data.dtype} {data.shape}")
    if len(labels) and labels.min() < 1:
        raise ValueError(f"{path}: labels are expected 1-based (Imagenet32/64 format)")
    class_map, classes = path.parent / CLASS_MAP_FILE, None
    if class_map.is_file():
        wnids = read_class_map(class_map)
        missing = sorted(set(labels.tolist()) - set(wnids))
        if missing:
            raise ValueError(f"{class_map} has no class {missing[0]} (of {len(missing)} missing)")
        labels, classes = imagenet_class_index([wnids[k] for k in labels.tolist()]), imagenet_wnids()
    else:
        labels = labels - 1
        logger.warning("%s: labels are ILSVRC devkit class numbers - 1, not ImageNet-1k (sorted wnid) indices; put "
                       "the devkit's %s next to it to condition ImageNet models on the right classes",
                       path, CLASS_MAP_FILE)
    return ArrayDataset(data.reshape(-1, 3, side, side), f"imagenet{side}-{path.stem}", "NCHW", labels, classes,
                        source=str(path))


def load_npz(path: str | os.PathLike, name: str | None = None) -> Dataset:
    """An ``.npz`` of images: ``x`` (+ ``y``, ``filenames``), ``jpeg`` + ``offsets`` (+ ``y``, ``wnids``: labels
    become ImageNet-1k indices), or downsampled-ImageNet ``data`` + ``labels``. ``name`` (the id prefix) defaults
    to the file stem with ``_`` -> ``-`` (so ``cifar10_test.npz`` gives ``cifar10-test-00042``)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        if "data" in keys and "labels" in keys:
            return load_downsampled_imagenet(path)
        name = name or path.stem.replace("_", "-")
        labels = f["y"] if "y" in keys else None
        if "x" in keys:
            x = f["x"]
            layout = "NCHW" if x.ndim == 4 and x.shape[1] == 3 and x.shape[3] != 3 else "NHWC"
            classes = CIFAR10_CLASSES if name.startswith("cifar10-") else None
            filenames = [str(n) for n in f["filenames"]] if "filenames" in keys else None
            return ArrayDataset(x, name, layout, labels, classes, str(path), filenames=filenames)
        if {"jpeg", "offsets"} <= keys:
            classes = None
            if "wnids" in keys and labels is not None:  # Tiny-ImageNet: y indexes wnids -> ImageNet-1k indices
                labels = imagenet_class_index(f["wnids"])[np.asarray(labels, dtype=np.int64)]
                classes = imagenet_wnids()
            return JpegBytesDataset(f["jpeg"], f["offsets"], name, labels, classes, str(path))
    raise ValueError(f"{path}: unknown npz layout with arrays {sorted(keys)}; "
                     "expected x[, y], jpeg + offsets, or data + labels")


def build_dataset(
    name_or_path: str | os.PathLike,
    split: str | None = None,
    root: str | os.PathLike | None = None,
    recursive: bool = False,
    on_error: ErrorCallback | None = None,
) -> Dataset:
    """A dataset by name (``cifar10``, ``tinyimagenet``; files looked up in :func:`data_root`) or by
    path (image folder, CIFAR-10 python folder or batch file, ``.npz``). ``ValueError`` lists the choices."""
    name = str(name_or_path)
    if name in DATASETS:
        pattern, splits, default, _ = DATASETS[name]
        split = split or default
        if split not in splits:
            raise ValueError(f"unknown split {split!r} for {name}: valid choices are {', '.join(splits)}")
        path = data_root(root) / pattern.format(split=split)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass root=... or set BCM_RESTORE_DATA "
                                    f"to the folder holding {path.name}")
        return load_npz(path, name=f"{name}-{split}")
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "test_batch").is_file() or (path / "data_batch_1").is_file():
            return load_cifar10_python(path, split)
        if split is not None:
            raise ValueError(f"split {split!r} does not apply to an image folder")
        return FolderDataset(path, recursive, on_error)
    if path.is_file() and re.fullmatch(r"data_batch_\d+|test_batch", path.name):
        return load_cifar10_python(path, split)
    if path.is_file() and path.suffix == ".npz":
        if split is not None:
            raise ValueError(f"split {split!r} does not apply to a single .npz file")
        return load_npz(path)
    choices = "; ".join(f"{n} (splits: {', '.join(s)})" for n, (_, s, _, _) in DATASETS.items())
    raise ValueError(
        f"unknown dataset {name!r}: valid choices are {choices}, or the path of an image folder, "
        "a CIFAR-10 python folder / batch file, or an .npz file"
    )
