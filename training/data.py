"""Training data: an in-memory image set and a deterministic, resumable batch order. Datasets are found
through the one registry, `restore.datasets`; the loop holds images as a uint8 NHWC numpy array (what the
CIFAR-10 ``.npz`` files hold), a float (N, C, H, W) tensor in [-1, 1], or a sequence of float (C, H, W) tensors. The
batch order is a pure function of (seed, step, rank), so resuming needs no sampler state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from operators.utils import from_uint8, image_seed
from restore.datasets import DATASETS, ArrayDataset, build_dataset

__all__ = ["ImageData", "batch_indices", "training_images"]


class ImageData:
    """Training images in [-1, 1]: ``data.batch(indices) -> (B, C, H, W) float32``.

    Accepts a uint8 NHWC numpy array (converted per batch, so 50k CIFAR images stay 150 MB), a float
    (N, C, H, W) tensor in [-1, 1], or a sequence of float (C, H, W) tensors."""

    def __init__(self, images: np.ndarray | torch.Tensor | Sequence[torch.Tensor]):
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
                raise ValueError(f"expected uint8 NHWC images with 1 or 3 channels, got {images.dtype} {images.shape}")
        elif isinstance(images, torch.Tensor):
            if not images.is_floating_point() or images.ndim != 4:
                raise ValueError(f"expected a float (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        elif len(images) == 0:
            raise ValueError("no training images")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        if isinstance(self.images, np.ndarray):
            n, h, w, c = self.images.shape
            return (c, h, w)
        return tuple(self.images[0].shape[-3:])

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.cpu().numpy()
        if isinstance(self.images, np.ndarray):
            return from_uint8(torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2)).contiguous()
        if isinstance(self.images, torch.Tensor):
            return self.images[torch.from_numpy(idx)].float()
        return torch.stack([self.images[int(i)] for i in idx]).float()


def batch_indices(num_images: int, batch: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Dataset indices of ``rank``'s share of the global batch at ``step``.

    The data are visited epoch by epoch, each epoch in a fresh permutation seeded by (seed, epoch); global
    batch ``step`` covers positions [step·B, (step+1)·B) of that endless stream and rank r takes the r-th
    contiguous slice of B/world. Deterministic in (seed, step, rank), hence exact resume for free."""
    local = batch // world
    start = step * batch + rank * local
    pos = torch.arange(start, start + local)
    epochs, offsets = pos // num_images, pos % num_images
    out = torch.empty(local, dtype=torch.long)
    for e in epochs.unique().tolist():
        perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(image_seed(seed, f"epoch{e}")))
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out


def training_images(spec: str, limit: int | None = None) -> np.ndarray:
    """uint8 NHWC images to train on: a dataset name of `restore.datasets.DATASETS` (its ``train`` split) or
    any path `restore.datasets.build_dataset` reads (an ``.npz``, an image folder of one size, ...); the first
    ``limit`` images if given."""
    ds = build_dataset(spec, split="train" if spec in DATASETS else None)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise ValueError(f"{spec}: no training images")
    if isinstance(ds, ArrayDataset) and ds.layout == "NHWC":
        return np.ascontiguousarray(ds.images[:n])
    return np.ascontiguousarray(ds.uint8(np.arange(n)).transpose(0, 2, 3, 1))
