"""Generation and inversion quality of an unconditional model: FID/KID vs NFE, inversion MSE vs NFE, grids.

The protocols of the BCM paper (Li & He 2024; docs/design.md#generation-and-inversion-quality), at any sample count:

* Generation: image ``k`` starts from x_T = sigma_max z_k, with z_k drawn from the generator seeded by
  ``(seed, k)`` (`operators.utils.image_seed`), so samples do not depend on the batch size. BCMs use the
  paper's chains (one-step, ancestral, zigzag, mixed for NFE 1-4, `restore.engine.sampling.sample_bcm`);
  consistency models CM multistep sampling on Karras levels; EDM denoisers one of `EDM_SAMPLERS` on Karras
  levels: EDM's Heun sampler (default) or BDIA-EDM (2 NFE per step: an odd NFE is 2 steps - 1 ending at 0, EDM's,
  an even NFE ends at sigma_min), DDIM or BDIA-DDIM (1 NFE per step, ending at 0), EDICT (2 per step, ending at 0).
  FID/KID against a reference set go through `benchmarks.fid`. A class-conditional model
  (``num_classes > 0``) generates sample ``k`` for class c_k drawn uniformly from the generator seeded by
  ``(seed, "k/class")`` (:func:`sample_class_labels`), as the EDM / consistency-model papers sample uniform random
  classes; the labels depend on neither NFE nor batch size and are recorded (``class_labels.csv``).
* Inversion: x~ = x + 0.07 z is inverted to sigma_max and regenerated (`restore.engine.bcm_inversion`); the error is
  `restore.engine.bcm_inversion.inversion_mse` (8-bit images in [0, 1]). BCM inversion levels are (0.07, 80) and
  (0.07, 15, 80) for 1 and 2 NFE (the paper's), Karras-spaced levels between 0.07 and 80 beyond that (our
  choice; the paper gives no levels). EDM models invert with the chosen sampler's inversion on Karras levels
  between sigma_min and sigma_max and regenerate on the same levels: Heun integrates the ODE up (approximate),
  DDIM inverts in the field's convention (approximate), BDIA-EDM, BDIA and EDICT invert exactly and regenerate
  from the returned pair (`restore.engine.exact_inversion`). A class-conditional model inverts and regenerates each
  image under its own (dataset) label.

The reported NFE is counted (`restore.engine.nfe`), per image.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from operators.utils import make_generators, randn, to_uint8
from restore.engine.bcm_inversion import bcm_reconstruct, inversion_mse
from restore.engine.exact_inversion import (
    bdia_invert,
    bdia_sample,
    ddim_invert,
    ddim_sample,
    edict_invert,
    edict_sample,
)
from restore.engine.sampling import edm_ode_invert, sample_bcm, sample_cm_multistep, sample_heun
from restore.engine.schedules import karras_sigmas
from restore.engine.wrappers import BCM, ConsistencyModel, class_conditioning, num_classes, serves

INVERSION_NOISE = 0.07  # the small-noise trick of docs/methods.md#bcm-inversion
PAPER_INVERSION_LEVELS = {1: (0.07, 80.0), 2: (0.07, 15.0, 80.0)}
# Samplers (and their inversions) of an EDM denoiser, with their NFE per step.
EDM_SAMPLERS = {"heun": 2, "bdia-edm": 2, "ddim": 1, "bdia": 1, "edict": 2}


def inversion_levels(nfe: int, sigma_max: float = 80.0, start: float = INVERSION_NOISE) -> tuple[float, ...]:
    """Ascending levels of an ``nfe``-jump BCM inversion (the paper's for 1-2 NFE, Karras-spaced beyond)."""
    if nfe < 1:
        raise ValueError(f"inversion NFE must be >= 1, got {nfe}")
    if nfe in PAPER_INVERSION_LEVELS and sigma_max == 80.0 and start == INVERSION_NOISE:
        return PAPER_INVERSION_LEVELS[nfe]
    return tuple(karras_sigmas(nfe + 1, start, sigma_max, append_zero=False).flip(0).tolist())


def edm_levels(nfe: int, sigma_min: float, sigma_max: float, sampler: str = "heun") -> torch.Tensor:
    """Descending Karras levels on which ``sampler`` costs exactly ``nfe``. Heun / BDIA-EDM: odd -> (nfe + 1) / 2
    steps ending at 0 (the last one Euler, EDM's default), even -> nfe / 2 Heun steps ending at sigma_min; DDIM /
    BDIA: nfe steps ending at 0; EDICT: nfe / 2 steps ending at 0 (even nfe)."""
    _check_edm_sampler(sampler)
    if nfe < 1:
        raise ValueError(f"EDM sampling NFE must be >= 1, got {nfe}")
    if sampler in ("heun", "bdia-edm"):
        if nfe % 2:
            return karras_sigmas((nfe + 1) // 2, sigma_min, sigma_max)
        return karras_sigmas(nfe // 2 + 1, sigma_min, sigma_max, append_zero=False)
    return karras_sigmas(_steps(nfe, sampler), sigma_min, sigma_max)


def _check_edm_sampler(sampler: str) -> None:
    if sampler not in EDM_SAMPLERS:
        raise ValueError(f"unknown EDM sampler {sampler!r}; known: {', '.join(EDM_SAMPLERS)}")


def _steps(nfe: int, sampler: str) -> int:
    per_step = EDM_SAMPLERS[sampler]
    if nfe < per_step or nfe % per_step:
        raise ValueError(f"{sampler} costs {per_step} NFE per step: NFE must be a positive multiple, got {nfe}")
    return nfe // per_step


def _edm_sample(model, x: torch.Tensor, sigmas, sampler: str, gamma: float | str, cond: dict) -> torch.Tensor:
    """Sample with ``sampler`` along descending ``sigmas`` from a state (or, for the exact inversions, a pair)."""
    if sampler == "heun":
        return sample_heun(model, x, sigmas, extra_args=cond)
    if sampler == "ddim":
        return ddim_sample(model, x, sigmas, extra_args=cond)
    if sampler == "edict":
        return edict_sample(model, x, sigmas, extra_args=cond)
    return bdia_sample(model, x, sigmas, gamma, heun=sampler == "bdia-edm", extra_args=cond)


def _edm_invert(model, x: torch.Tensor, sigmas, sampler: str, gamma: float | str, cond: dict):
    """The inversion of ``sampler`` along ascending ``sigmas``: a state (Heun ODE, DDIM) or a pair (exact ones)."""
    if sampler == "heun":
        return edm_ode_invert(model, x, sigmas, extra_args=cond)
    if sampler == "ddim":
        return ddim_invert(model, x, sigmas, extra_args=cond)
    if sampler == "edict":
        return edict_invert(model, x, sigmas, extra_args=cond)
    return bdia_invert(model, x, sigmas, gamma, heun=sampler == "bdia-edm", extra_args=cond)


def _sample(model, x_T: torch.Tensor, nfe: int, generators, edm_sampler: str, gamma: float | str,
            cond: dict) -> torch.Tensor:
    if isinstance(model, BCM):
        return sample_bcm(model, x_T, nfe, generator=generators, extra_args=cond)
    if isinstance(model, ConsistencyModel):
        # nfe levels above sigma_min (the trailing sigma_min only ends the plan: cm_multistep_plan drops it)
        levels = karras_sigmas(nfe + 1, model.sigma_min, model.sigma_max, append_zero=False).tolist()
        return sample_cm_multistep(model, x_T, levels, generator=generators, extra_args=cond)
    if serves(model, "edm"):  # EDM denoisers and what stands in for one (VP-epsilon)
        return _edm_sample(model, x_T, edm_levels(nfe, model.sigma_min, model.sigma_max, edm_sampler), edm_sampler,
                           gamma, cond)
    raise TypeError(f"no sampler for {type(model).__name__}")


def sample_class_labels(model, n: int, seed: int = 0) -> torch.Tensor | None:
    """The classes of samples 0..n-1 of a class-conditional ``model``: sample k's is uniform over the
    ``num_classes`` classes, drawn from the generator of ``(seed, "k/class")`` (a stream apart from the sample's
    noise z_k), so it depends on neither NFE nor batch size. None for an unconditional model."""
    classes = num_classes(model)
    if not classes:
        return None
    gens = make_generators(seed, [f"{k}/class" for k in range(n)])
    return torch.cat([torch.randint(classes, (1,), generator=g) for g in gens])


def generate(model, n: int, nfe: int, *, seed: int = 0, batch_size: int = 250,
             image_shape: tuple[int, int, int] | None = None, device: str | torch.device = "cpu",
             edm_sampler: str = "heun", gamma: float | str = 0.5) -> tuple[torch.Tensor, float]:
    """``n`` samples as uint8 ``(n, C, H, W)`` and the counted NFE per image; ``edm_sampler`` / ``gamma`` choose
    the sampler of an EDM denoiser (BDIA's gamma for "bdia-edm" / "bdia"); a class-conditional model draws the
    classes of :func:`sample_class_labels`."""
    _check_edm_sampler(edm_sampler)
    shape = image_shape or (model.net.config.out_channels, model.net.config.img_resolution,
                            model.net.config.img_resolution)
    labels = sample_class_labels(model, n, seed)
    out, forward = [], 0
    with torch.inference_mode(), model.counter.counting() as tally:
        for start in range(0, n, batch_size):
            ids = range(start, min(n, start + batch_size))
            gens = make_generators(seed, ids, device)
            x_T = model.sigma_max * randn((len(ids), *shape), gens, device=device)
            cond = class_conditioning(model, None if labels is None else labels[ids.start:ids.stop], len(ids),
                                      device)
            out.append(to_uint8(_sample(model, x_T, nfe, gens, edm_sampler, gamma, cond)).cpu())
            forward = tally.forward
    return torch.cat(out), forward / math.ceil(n / batch_size)


def reconstruct(model, images: torch.Tensor, nfe: int, *, seed: int = 0, ids: Sequence | None = None,
                edm_sampler: str = "heun", gamma: float | str = 0.5, class_labels=None) -> torch.Tensor:
    """Invert ``images`` ([-1, 1]) to sigma_max with ``nfe`` network evaluations and regenerate them
    (``class_labels``: the images' classes, for a class-conditional model).

    BCM: ``nfe`` jumps up and one down (docs/methods.md#bcm-inversion). EDM: ``nfe`` / (the sampler's NFE per step)
    steps up on Karras levels from sigma_min and the same levels back down with ``edm_sampler``; exact inversions
    regenerate from their pair, so they skip the first sampling step.
    """
    _check_edm_sampler(edm_sampler)
    ids = range(len(images)) if ids is None else ids
    gens = make_generators(seed, ids, images.device)
    cond = class_conditioning(model, class_labels, len(images), images.device)
    if isinstance(model, BCM):
        return bcm_reconstruct(model, images, inversion_levels(nfe, model.sigma_max), INVERSION_NOISE, generator=gens,
                               extra_args=cond)
    if serves(model, "edm"):  # EDM denoisers and what stands in for one (VP-epsilon)
        levels = karras_sigmas(_steps(nfe, edm_sampler) + 1, model.sigma_min, model.sigma_max, append_zero=False)
        latent = _edm_invert(model, images, levels.flip(0), edm_sampler, gamma, cond)
        return _edm_sample(model, latent, levels, edm_sampler, gamma, cond)
    raise TypeError(f"{type(model).__name__} cannot invert images")


def _row(metric: str, value: float, nfe: float, seconds: float, **fields) -> dict:
    return {"image_id": "*", "metric": metric, "value": float(value), "nfe": nfe, "seconds": seconds, **fields}


def evaluate_generation(model, reference: np.ndarray | torch.Tensor, nfes: Sequence[int], *, n: int = 1000,
                        seed: int = 0, batch_size: int = 250, fid_cache=None, edm_sampler: str = "heun",
                        gamma: float | str = 0.5) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """FID and KID of ``n`` samples per NFE against ``reference`` (an image set as `benchmarks.fid` takes it).
    Returns rows
    (``metric, value, nfe, seconds``; seconds = sampling time per image) and the samples per NFE."""
    from benchmarks.fid import compute_fid_kid

    rows, samples = [], {}
    for nfe in nfes:
        start = time.perf_counter()
        x, counted = generate(model, n, nfe, seed=seed, batch_size=batch_size, edm_sampler=edm_sampler, gamma=gamma)
        seconds = (time.perf_counter() - start) / n
        scores = compute_fid_kid(x, reference, cache=fid_cache)
        rows += [_row("fid", scores["fid"], counted, seconds, n=n),
                 _row("kid", scores["kid"], counted, seconds, n=n)]
        samples[nfe] = x
    return rows, samples


def evaluate_inversion(model, images: torch.Tensor, nfes: Sequence[int], *, seed: int = 0, batch_size: int = 250,
                       edm_sampler: str = "heun", gamma: float | str = 0.5,
                       class_labels: torch.Tensor | None = None) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """Per-image inversion MSE for each inversion NFE (rows with ``image_id`` = index); also the
    reconstructions per NFE, in [-1, 1]. ``class_labels``: the images' classes (class-conditional models)."""
    rows, recs = [], {}
    for nfe in nfes:
        parts = []
        start = time.perf_counter()
        with torch.inference_mode(), model.counter.counting() as tally:
            for lo in range(0, len(images), batch_size):
                batch = images[lo:lo + batch_size]
                labels = None if class_labels is None else class_labels[lo:lo + len(batch)]
                parts.append(reconstruct(model, batch, nfe, seed=seed, ids=range(lo, lo + len(batch)),
                                         edm_sampler=edm_sampler, gamma=gamma, class_labels=labels))
        seconds = (time.perf_counter() - start) / len(images)
        total = tally.forward / math.ceil(len(images) / batch_size)
        recs[nfe] = torch.cat(parts)
        mse = inversion_mse(images, recs[nfe])
        rows += [{"image_id": str(i), "metric": "inversion_mse", "value": float(v), "nfe": total, "seconds": seconds}
                 for i, v in enumerate(mse.tolist())]
    return rows, recs


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1) -> torch.Tensor:
    """Tile ``(N, C, H, W)`` images in [-1, 1] into one ``(C, H', W')`` image, row-major, ``pad`` white
    pixels apart."""
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = images.new_ones((c, rows * (h + pad) + pad, nrow * (w + pad) + pad))
    for k in range(n):
        r, q = divmod(k, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top:top + h, left:left + w] = images[k]
    return grid
