"""The one seed derivation for per-image randomness, shared by `restore run`, the benchmark runner and Python
users: image ``i`` of a run with seed ``s`` measures with the generator of key ``i`` and restores with the
generator of key ``i/restore`` (`operators.utils.image_seed` hashes ``(s, key)``). Outputs therefore depend on
neither batch size, order nor the number of processes, and the same image and seed give the same result in
every tool. A tiled image restores tile ``k`` with the key ``i#tile{k}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from operators.utils import make_generators


def measurement_generators(seed: int, image_ids: Sequence[str], device: str | torch.device = "cpu",
                           ) -> list[torch.Generator]:
    """One generator per image for ``op.measure`` (measurement noise, random boxes)."""
    return make_generators(seed, [str(i) for i in image_ids], device)


def restoration_generators(seed: int, image_ids: Sequence[str], device: str | torch.device = "cpu",
                           ) -> list[torch.Generator]:
    """One generator per image for the restoration method, a stream independent of the measurement's."""
    return make_generators(seed, [f"{i}/restore" for i in image_ids], device)


def tile_id(image_id: str, tile: int) -> str:
    """The id whose restoration generator tile ``tile`` of a tiled image uses."""
    return f"{image_id}#tile{tile}"
