"""Stage 2, measuring: the degraded inputs y of a batch, made once per operator and seed, then read back.

Input: the operator family of a cell (e.g. ``randbox:size=8``), its spec and seed, a batch of clean
images with their ids and the batch's measurement generators (one per image; the execute stage
derives them). Output: :class:`Measured`, the operator drawn for the batch (randbox: its boxes) and
the measurements ``y``.

The cache lives in ``degraded/<op>-seed<s>-<hash>/<image id>.npy`` (float32, exact), keyed by dataset,
operator spec and seed, so every method and NFE budget of a suite restores the very same ``y``. The
operator is always drawn from the generators -- also when ``y`` comes from the cache -- so the boxes
match the cached measurement. For the grid images the degraded input (as an image of the clean size)
and the ground truth are also written as PNG. Every file is written atomically (:mod:`restore.app.io`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.runner.plan import slug
from benchmarks.suites import config_hash
from operators import Operator


def degraded_dir(out: Path, dataset: str, spec: str, seed: int) -> Path:
    """The cache folder of operator ``spec`` at ``seed`` on ``dataset`` inside the output folder ``out``."""
    h = config_hash({"dataset": dataset, "operator": spec, "seed": seed})
    return out / "degraded" / f"{slug(spec)}-seed{seed}-{h[:8]}"


def display(y: torch.Tensor, shape) -> torch.Tensor:
    """A measurement as an image of the clean size (nearest-neighbour upsampling for low-resolution ones)."""
    if tuple(y.shape[-2:]) == tuple(shape[-2:]):
        return y
    return torch.nn.functional.interpolate(y, size=tuple(shape[-2:]), mode="nearest")


@dataclass(frozen=True)
class Measured:
    """A batch's measurements and the operator that made them (the one to restore and score with)."""

    op: Operator
    y: torch.Tensor


@dataclass(frozen=True)
class MeasurementCache:
    """The measurement cache of one output folder and dataset."""

    out: Path
    dataset: str  # dataset name, part of the cache key
    grid_ids: frozenset[str]  # images whose degraded input and ground truth are also saved as PNG

    def folder(self, spec: str, seed: int) -> Path:
        return degraded_dir(self.out, self.dataset, spec, seed)

    def measure(self, family: Operator, spec: str, seed: int, ids: list[str], x: torch.Tensor, generators) -> Measured:
        """The measurements of images ``x`` (ids ``ids``): read from the cache, else made and cached."""
        from restore.app.io import output_path, write_png
        from restore.runtime.files import atomic_write

        folder = self.folder(spec, seed)
        paths = [output_path(folder, i, ".npy") for i in ids]
        op = family.draw(x.shape, generators, device=x.device)  # random boxes first, then the noise
        if all(p.is_file() for p in paths):
            y = torch.from_numpy(np.stack([np.load(p, allow_pickle=False) for p in paths])).to(x.device)
            return Measured(op, y)
        with torch.no_grad():  # not inference_mode: gradient-based methods take y into autograd
            y = op.measure(x, generators)
        for p, yi in zip(paths, y.cpu().numpy()):
            atomic_write(p, lambda f, yi=yi: np.save(f, yi, allow_pickle=False))
        for k, i in enumerate(ids):
            if i in self.grid_ids:
                write_png(display(y[k:k + 1], x.shape), output_path(folder, i))
                write_png(x[k:k + 1], output_path(self.out / "reference", i))
        return Measured(op, y)
