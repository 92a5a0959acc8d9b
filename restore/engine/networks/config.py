"""What every backbone config shares: level sizes, a JSON-able dict form (stored in checkpoints), named presets."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class NetworkConfig:
    """Mixin of the frozen dataclass configs of the backbones: ``to_dict`` / ``from_dict`` (tuples stored as lists,
    unknown keys an error listing the valid ones) and ``preset(name, **overrides)`` from the class's ``presets``
    table (set by its module once the table exists; ``family`` names the network in messages)."""

    presets: ClassVar[dict[str, Any]] = {}
    family: ClassVar[str] = "network"

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map size of each level (``img_resolution`` halved per level of ``channel_mult``)."""
        return tuple(self.img_resolution >> level for level in range(len(self.channel_mult)))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any):
        """A named architecture with optional field overrides, e.g. ``preset("cifar-small", bidirectional=True)``."""
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.family} preset {name!r}; known: {sorted(cls.presets)}")
        return dataclasses.replace(cls.presets[name], **overrides)
