"""Image files <-> tensors: the one place where 8-bit files meet ``(B, 3, H, W)`` float32 in [-1, 1].

Reading
-------
* Files: ``.png .jpg .jpeg .bmp .webp`` (extension matched case-insensitively; the decoder follows
  the content, so a PNG named ``.jpg`` still reads). Names starting with ``.`` (hidden files and
  folders, our own temporary files) are ignored. With ``recursive=True`` sub-folders are walked
  (symlinked folders are not followed).
* Image ids are the path relative to the input folder, posix style, **with** extension
  (``"sub/cat.jpg"``): unambiguous when ``cat.jpg`` and ``cat.png`` both exist, and identical on
  every OS. Listing order is the sorted order of the ids, so ids and order are stable.
* Pixel conversion to 8-bit RGB, the same for every file:

  - grey (``L``, ``1``) -> the grey value replicated to R, G and B;
  - palette (``P``) -> its colours via Pillow's ``convert`` (palette transparency counts as alpha);
  - anything with alpha (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a ``tRNS`` key) ->
    composited over **white**: ``round((c * a + 255 * (255 - a)) / 255)``, so transparent areas look
    as they do in a viewer on a white page and the colour of fully transparent pixels never leaks in;
  - 16-bit grey (``I;16*``) and 32-bit integer (``I``) -> clipped to [0, 65535] and scaled by
    ``round(v * 255 / 65535)`` (the exact map of the 16-bit range onto 8 bit; it inverts the usual
    ``v * 257`` expansion of 8-bit data, which ``round(v / 256)`` does not), then replicated;
    16-bit RGB(A) PNGs are reduced to 8 bit by Pillow's decoder;
  - ``CMYK``, ``YCbCr`` and the rest -> Pillow's ``convert("RGB")`` (no ICC colour management; ICC
    profiles are ignored everywhere: pixels are taken as stored);
  - the EXIF orientation tag is applied (the image is the way a viewer shows it); animated files
    give their first frame.
* Bad files never stop a run: :func:`read_image` raises :class:`ImageReadError` with a one-line
  reason; :class:`ImageFolder` and :func:`iter_batches` report ``(image_id, reason)`` to ``on_error``
  (default: a logging warning) and skip the file. Files with other extensions are reported too.

Class labels
------------
A folder may hold ``labels.csv`` (:data:`LABELS_FILE`, columns ``file,label``): ``file`` is an image id as
above (``sub/cat.png``), ``label`` a 0-based class index. :func:`read_labels` reads such a file;
:class:`ImageFolder` reads its own into ``labels`` (image id -> label), which class-conditional models need
(``restore run --class-labels FILE|INT``, the dataset registry). It is not an image, so it is not reported.

Batching
--------
Images of different sizes cannot share a tensor, so batches hold images of one size. Sizes are read
from the file headers first; sizes are visited in the order of their first image id, and within a
size the images keep id order (:func:`group_by_size`). Each batch therefore has at most
``batch_size`` images and the order depends only on the folder's contents (and the ids skipped).

Writing
-------
8-bit PNG (:func:`write_png`), written atomically: a hidden temporary file in the target folder is
renamed onto the target with ``os.replace``, so a killed run never leaves a half-written image (the
rename is atomic for the process; power loss is not covered: no fsync). Inputs are never
overwritten: :func:`check_output_dir` refuses an output folder equal to the input folder (and one
inside it when reading recursively), and :class:`OutputGuard` refuses any target that resolves to an
input file. :func:`output_path` maps an id to its output file (sub-folders kept, suffix replaced).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image

from operators.utils import from_uint8, to_uint8
from restore.runtime.files import atomic_write

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABELS_FILE",
    "ImageFolder",
    "ImageReadError",
    "OutputError",
    "OutputGuard",
    "check_output_dir",
    "group_by_size",
    "image_id",
    "image_size",
    "iter_batches",
    "list_images",
    "output_path",
    "read_image",
    "read_image_uint8",
    "read_labels",
    "write_png",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LABELS_FILE = "labels.csv"  # a folder's class labels: columns file,label

Source = str | os.PathLike | bytes | BinaryIO
ErrorCallback = Callable[[str, str], None]

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}


class ImageReadError(Exception):
    """A file that cannot be read as an image; ``str(err)`` is one line naming the file and why."""

    def __init__(self, source: object, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class OutputError(ValueError):
    """An output location that would overwrite or mix with the inputs."""


# --------------------------------------------------------------------------- reading one image


def _describe(source: Source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else str(getattr(source, "name", "<bytes>"))


def _open(source: Source) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from the header bytes only: ``im.getexif()`` would decode a whole PNG."""
    data = im.info.get("exif")
    if not data:
        return 1
    exif = Image.Exif()
    try:
        exif.load(data)
        value = int(exif.get(ExifTags.Base.Orientation, 1))
    except Exception:  # broken metadata must not cost the pixels
        return 1
    return value if value in _TRANSPOSE else 1


def _fail(source: Source, exc: Exception) -> ImageReadError:
    lines = str(exc).strip().splitlines()
    return ImageReadError(_describe(source), f"{type(exc).__name__}: {lines[0] if lines else 'unreadable'}")


def image_size(source: Source) -> tuple[int, int]:
    """``(H, W)`` of the image as :func:`read_image` returns it, from the header (no decoding)."""
    try:
        with _open(source) as im:
            w, h = im.size
            return (w, h) if _orientation(im) in _SWAPS_AXES else (h, w)
    except Exception as exc:
        raise _fail(source, exc) from exc


def _to_rgb(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> (H, W, 3) uint8 by the module's conversion rule."""
    if im.mode.startswith("I;16") or im.mode == "I":
        v = np.asarray(im).astype(np.int64).clip(0, 65535)
        grey = ((v * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535), halves up
        return np.repeat(grey[..., None], 3, axis=2)
    if im.has_transparency_data:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.int32)
        a = rgba[..., 3:]
        return ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)  # a writable copy


def read_image_uint8(source: Source) -> np.ndarray:
    """Decode an image file (path, bytes or binary file object) to (H, W, 3) uint8 RGB.

    Raises :class:`ImageReadError` for anything that is not a readable image.
    """
    try:
        with _open(source) as im:
            im.load()  # decode now so truncated files fail here, inside the try
            orientation = _orientation(im)
            rgb = _to_rgb(im)
        if orientation != 1:
            rgb = np.array(Image.fromarray(rgb).transpose(_TRANSPOSE[orientation]))
        return rgb
    except Exception as exc:
        raise _fail(source, exc) from exc


def read_image(source: Source) -> torch.Tensor:
    """Decode an image file to a float32 (3, H, W) tensor in [-1, 1] (see the module's conversion rule)."""
    return from_uint8(torch.from_numpy(np.ascontiguousarray(read_image_uint8(source).transpose(2, 0, 1))))


# --------------------------------------------------------------------------- folders


def image_id(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """The stable id of ``path`` inside ``root``: relative posix path with extension."""
    return Path(path).relative_to(root).as_posix()


def _walk(folder: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return found


def _check_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"input folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    return folder


def list_images(folder: str | os.PathLike, recursive: bool = False,
                on_error: ErrorCallback | None = None) -> list[Path]:
    """Image files in ``folder`` sorted by id; other (non-hidden) files are reported to ``on_error``."""
    folder = _check_folder(folder)
    images = []
    for path in sorted(_walk(folder, recursive), key=lambda p: image_id(p, folder)):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        elif path == folder / LABELS_FILE:
            continue  # the folder's class labels (module docstring)
        elif on_error is not None:
            on_error(image_id(path, folder), f"not an image file (supported: {', '.join(IMAGE_EXTENSIONS)})")
    return images


def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """``{image id: class label}`` from a ``file,label`` CSV (:data:`LABELS_FILE`); ValueError naming the file and
    line for a missing column, a non-integer or negative label, or a file listed twice."""
    path = Path(path)
    labels: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"file", "label"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: a labels file needs the columns file,label; got {reader.fieldnames}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            name, value = (row["file"] or "").strip(), (row["label"] or "").strip()
            if not value.isdigit():
                raise ValueError(f"{where}: label must be a non-negative integer, got {value!r}")
            if name in labels:
                raise ValueError(f"{where}: {name!r} is listed twice")
            labels[name] = int(value)
    return labels


def group_by_size(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Split positions ``0..len(sizes)-1`` into batches of equal size, at most ``batch_size`` long.

    Sizes are visited in order of first appearance, positions keep their order within a size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    return [g[k : k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


def _warn(image_id: str, reason: str) -> None:
    logger.warning("skipping %s: %s", image_id, reason)


class ImageFolder:
    """The readable images of a folder: stable ``ids``, their ``paths`` and header ``sizes``.

    Construction lists the folder and reads every header; files that are not images, or whose header
    is unreadable, are reported to ``on_error(image_id, reason)`` (default: logging warning) and left
    out. Files that fail later, while decoding, are reported and skipped by :meth:`batches`.
    """

    def __init__(self, root: str | os.PathLike, recursive: bool = False, on_error: ErrorCallback | None = None):
        self.root = _check_folder(root)
        self.recursive = recursive
        label_file = self.root / LABELS_FILE
        # image id -> class label from the folder's labels.csv (module docstring); None without one
        self.labels: dict[str, int] | None = read_labels(label_file) if label_file.is_file() else None
        self.on_error = on_error or _warn
        self.ids: list[str] = []
        self.paths: list[Path] = []
        self.sizes: list[tuple[int, int]] = []
        for path in list_images(self.root, recursive, self.on_error):
            try:
                size = image_size(path)
            except ImageReadError as err:
                self.on_error(image_id(path, self.root), err.reason)
                continue
            self.ids.append(image_id(path, self.root))
            self.paths.append(path)
            self.sizes.append(size)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, recursive={self.recursive}, images={len(self)})"

    def batches(self, batch_size: int, skip: Iterable[str] = (),
                workers: int = 0) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Yield ``(ids, x)`` with ``x`` float32 (B, 3, H, W) in [-1, 1], grouped by size (module docstring).

        ``skip``: ids to leave out (e.g. already restored). ``workers`` > 0 decodes each batch with
        that many threads (Pillow releases the GIL while decoding); the result does not depend on it.
        """
        skip = set(skip)
        keep = [i for i, name in enumerate(self.ids) if name not in skip]
        groups = group_by_size([self.sizes[i] for i in keep], batch_size)
        pool = ThreadPoolExecutor(workers) if workers > 0 else None
        try:
            for group in groups:
                members = [keep[j] for j in group]
                paths = [self.paths[i] for i in members]
                decoded = list(pool.map(self._decode, paths) if pool else map(self._decode, paths))
                ids, arrays = [], []
                for i, arr in zip(members, decoded):
                    if isinstance(arr, ImageReadError):
                        self.on_error(self.ids[i], arr.reason)
                    elif arr.shape[:2] != self.sizes[i]:
                        self.on_error(self.ids[i], f"size changed while reading: {arr.shape[:2]} != {self.sizes[i]}")
                    else:
                        ids.append(self.ids[i])
                        arrays.append(arr)
                if ids:
                    yield ids, from_uint8(torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    @staticmethod
    def _decode(path: Path) -> np.ndarray | ImageReadError:
        try:
            return read_image_uint8(path)
        except ImageReadError as err:
            return err


def iter_batches(
    folder: str | os.PathLike,
    batch_size: int,
    recursive: bool = False,
    skip: Iterable[str] = (),
    on_error: ErrorCallback | None = None,
    workers: int = 0,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``ImageFolder(folder, recursive, on_error).batches(batch_size, skip, workers)``.

    To collect the skipped files: ``errors = []; iter_batches(..., on_error=lambda i, r: errors.append((i, r)))``.
    """
    return ImageFolder(folder, recursive, on_error).batches(batch_size, skip, workers)


# --------------------------------------------------------------------------- writing


def output_path(out_dir: str | os.PathLike, image_id: str, suffix: str = ".png") -> Path:
    """Where the output for ``image_id`` goes: ``out_dir/<id with its suffix replaced>``, sub-folders kept."""
    rel = Path(image_id)
    if rel.is_absolute() or ".." in rel.parts:
        raise OutputError(f"image id {image_id!r} must be a relative path inside the folder")
    return Path(out_dir) / rel.with_suffix(suffix)


def check_output_dir(input_dir: str | os.PathLike, output_dir: str | os.PathLike, recursive: bool = False) -> Path:
    """Refuse an output folder equal to the input folder, or inside it when inputs are read recursively
    (a second run would read the outputs as inputs). Returns ``output_dir`` as a ``Path``."""
    src, dst = Path(input_dir).resolve(), Path(output_dir).resolve()
    if src == dst:
        raise OutputError(f"output folder {output_dir} is the input folder; choose another one")
    if recursive and src in dst.parents:
        raise OutputError(f"output folder {output_dir} is inside the input folder {input_dir}, "
                          "which is read recursively")
    return Path(output_dir)


def _check_images(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) or (B, C, H, W) with C in (1, 3) -> (B, C, H, W); NaN refused (it has no 8-bit value)."""
    x = x[None] if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (C, H, W) or (B, C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    if torch.isnan(x).any():
        raise ValueError("image contains NaN values")
    return x


def _save_png(x_uint8: np.ndarray, path: Path) -> Path:
    """Write one (C, H, W) uint8 array as PNG, atomically."""
    img = Image.fromarray(x_uint8[0] if x_uint8.shape[0] == 1 else x_uint8.transpose(1, 2, 0))
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def _refuse_protected(path: Path, protected: Iterable[str | os.PathLike]) -> None:
    target = path.resolve()
    if any(target == Path(p).resolve() for p in protected):
        raise OutputError(f"refusing to overwrite input file {path}")


def write_png(x: torch.Tensor, path: str | os.PathLike, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Save one [-1, 1] image ((C, H, W) or (1, C, H, W), C = 3 or 1) as an 8-bit PNG, atomically.

    The file holds ``operators.utils.to_uint8(x)``, so reading it back gives ``quantize(x)`` exactly.
    ``protect``: files that must never be overwritten (compared after resolving links).
    """
    path = Path(path)
    x = _check_images(x)
    if x.shape[0] != 1:
        raise ValueError(f"write_png writes one image, got a batch of {x.shape[0]}")
    _refuse_protected(path, protect)
    return _save_png(to_uint8(x[0]).cpu().numpy(), path)


class OutputGuard:
    """Writes outputs for a set of inputs without ever overwriting one.

    ``OutputGuard.for_folder(folder, out_dir)`` checks the folders (:func:`check_output_dir`) and
    protects every listed input image; ``protect`` adds files (e.g. references). Output names follow
    :func:`output_path`; when two input ids would get the same name (``a.jpg`` and ``a.png``), the one
    already carrying the output suffix keeps it and the others keep their full name plus the suffix
    (``a.jpg.png``). Names depend only on the set of ``ids``, not on which ones a run writes.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        protect: Iterable[str | os.PathLike] = (),
        ids: Iterable[str] = (),
        suffix: str = ".png",
    ):
        self.output_dir = Path(output_dir)
        self.suffix = suffix
        self._protected = {Path(p).resolve() for p in protect}
        self._names = self._assign_names(list(ids))

    @classmethod
    def for_folder(cls, folder: ImageFolder, output_dir: str | os.PathLike,
                   protect: Iterable[str | os.PathLike] = (), suffix: str = ".png") -> OutputGuard:
        check_output_dir(folder.root, output_dir, folder.recursive)
        return cls(output_dir, [*folder.paths, *protect], folder.ids, suffix)

    def _assign_names(self, ids: list[str]) -> dict[str, Path]:
        plain = {i: output_path(self.output_dir, i, self.suffix) for i in ids}
        claims: dict[Path, list[str]] = {}
        for i, p in plain.items():
            claims.setdefault(p, []).append(i)
        names = {}
        for p, owners in claims.items():
            for i in owners:
                keeps = len(owners) == 1 or Path(i).suffix == self.suffix
                names[i] = p if keeps else self.output_dir / (i + self.suffix)
        if len(set(names.values())) != len(names):
            raise OutputError("input ids map to clashing output names; rename the inputs")
        return names

    def path(self, image_id: str) -> Path:
        """The output file for ``image_id`` (refused if it is an input file)."""
        path = self._names.get(image_id) or output_path(self.output_dir, image_id, self.suffix)
        if path.resolve() in self._protected:
            raise OutputError(f"refusing to overwrite input file {path}")
        return path

    def write_png(self, x: torch.Tensor, image_id: str) -> Path:
        """Write one image for ``image_id``; returns the file written."""
        return write_png(x, self.path(image_id))

    def write_batch(self, x: torch.Tensor, ids: Sequence[str]) -> list[Path]:
        """Write a (B, C, H, W) batch, image ``k`` for ``ids[k]``; every target is checked before any write."""
        x = _check_images(x)
        if len(ids) != x.shape[0]:
            raise ValueError(f"{len(ids)} ids for a batch of {x.shape[0]} images")
        paths = [self.path(i) for i in ids]
        pixels = to_uint8(x).cpu().numpy()  # one quantisation for the batch: per-image tensor ops are slow
        return [_save_png(p, path) for p, path in zip(pixels, paths)]
