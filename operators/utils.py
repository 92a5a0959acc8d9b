"""Low-level helpers shared by every package: image ranges, 8-bit quantisation, explicit randomness.

`operators` is the bottom of the dependency graph (operators <- restore <- baselines <- benchmarks),
so the conventions every layer relies on live here:

* images are ``float32`` tensors of shape ``(B, C, H, W)`` in ``[-1, 1]``;
* files hold 8-bit values; :func:`quantize` maps a tensor onto exactly what a PNG would store;
* randomness is explicit: a ``generator`` is ``None``, one ``torch.Generator`` or a list with one per
  image, and per-image seeds derive from ``(run seed, image id)`` (:func:`image_seed`);
* cached tensors (operator matrices, tables) are built outside inference mode (:func:`tensor_cache`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1]."""
    return (x + 1) / 2


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """Map images from [0, 1] to [-1, 1]."""
    return x * 2 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 in [0, 255], rounding half away from zero after clamping."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1]."""
    return x.float() / 127.5 - 1


def quantize(x: torch.Tensor) -> torch.Tensor:
    """What an 8-bit PNG of ``x`` stores, back in [-1, 1] float32 (clamps, rounds to 1/127.5 steps)."""
    return from_uint8(to_uint8(x)).to(x.device)


def tensor_cache(maxsize: int = 64):
    """``functools.lru_cache`` for functions that build tensors, run with ``torch.inference_mode(False)``: a tensor
    first built under ``torch.inference_mode()`` (a restoration) would be an inference tensor, which a later
    autograd computation (DPS, PiGDM) in the same process cannot use."""

    def decorate(fn):
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def cached(*args):
            with torch.inference_mode(False):
                return fn(*args)

        return cached

    return decorate


def image_seed(seed: int, image_id: str | int) -> int:
    """A 63-bit seed for one image, derived from the run seed and the image's stable id.

    Results then do not depend on batch size, order or the number of processes.
    """
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generators(seed: int, image_ids: Sequence[str | int],
                    device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per image (see :func:`image_seed`)."""
    return [torch.Generator(device).manual_seed(image_seed(seed, i)) for i in image_ids]


def _per_image(generator: Generator, batch: int) -> list[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * batch  # a single generator is consumed in batch order
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch} images")
    return gens


def randn(shape: Sequence[int], generator: Generator = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (batch first); a list of generators draws image i from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return _draw(torch.randn, tuple(shape), generator, device, dtype)
    gens = _per_image(generator, shape[0])
    return torch.cat([_draw(torch.randn, (1, *shape[1:]), g, device, dtype) for g in gens])


def rand(shape: Sequence[int], generator: Generator = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) noise; same generator rules as :func:`randn`."""
    if generator is None or isinstance(generator, torch.Generator):
        return _draw(torch.rand, tuple(shape), generator, device, dtype)
    gens = _per_image(generator, shape[0])
    return torch.cat([_draw(torch.rand, (1, *shape[1:]), g, device, dtype) for g in gens])


def _draw(fn, shape, generator, device, dtype):
    # Draw on the generator's device (a CPU generator cannot feed a CUDA tensor), then move.
    gen_device = generator.device if generator is not None else device
    return fn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
