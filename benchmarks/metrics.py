"""The metric table the benchmark runner uses: per-image PSNR, SSIM, consistency-PSNR (:mod:`restore.quality`)
and set-level FID and KID (:mod:`benchmarks.fid`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks import fid as _fid
from restore.quality import PSNR_CAP, consistency_psnr, psnr, ssim

__all__ = ["METRICS", "PSNR_CAP", "Metric", "consistency_psnr", "fid", "get_metric", "kid", "psnr", "ssim"]


def fid(images, reference, **kwargs) -> float:
    """FID between an image set and a reference set or cached-features key (:func:`benchmarks.fid.compute_fid_kid`)."""
    return _fid.compute_fid_kid(images, reference, **kwargs)["fid"]


def kid(images, reference, **kwargs) -> float:
    """KID (mean over subsets) between an image set and a reference (:func:`benchmarks.fid.compute_fid_kid`)."""
    return _fid.compute_fid_kid(images, reference, **kwargs)["kid"]


@dataclass(frozen=True)
class Metric:
    """A metric the runner can compute.

    ``inputs`` names the keyword arguments ``fn`` takes: ``x_hat`` (restoration), ``x`` (ground truth),
    ``y`` (measurement) and ``op`` (operator) for per-image metrics; ``images`` and ``reference``
    (image sets or a cached-features key) for set metrics, which return one float per set
    (``image_id = "*"`` in result tables). Use :func:`benchmarks.fid.compute_fid_kid` to get FID and
    KID from one feature pass.
    """

    name: str
    fn: Callable
    higher_is_better: bool
    per_image: bool
    inputs: tuple[str, ...]
    unit: str = ""

    def __call__(self, **available):
        missing = [k for k in self.inputs if k not in available]
        if missing:
            raise ValueError(f"metric {self.name!r} needs {missing}")
        return self.fn(**{k: available[k] for k in self.inputs})


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("psnr", psnr, True, True, ("x_hat", "x"), "dB"),
        Metric("ssim", ssim, True, True, ("x_hat", "x")),
        Metric("cpsnr", consistency_psnr, True, True, ("x_hat", "y", "op"), "dB"),
        Metric("fid", fid, False, False, ("images", "reference")),
        Metric("kid", kid, False, False, ("images", "reference")),
    )
}


def get_metric(name: str) -> Metric:
    """The :class:`Metric` called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}") from None

