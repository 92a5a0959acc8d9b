"""Convert upstream checkpoints to this package's safetensors format (`restore convert SRC DST --from FORMAT`).

One module per checkpoint family; each registers a `Converter` in `CONVERTERS` under its ``--from`` name. A
converter reads the upstream file without executing anything from it (``torch.load(weights_only=True)``,
safetensors, or a restricted unpickler), loads the weights into this package's backbone with ``strict=True``
and returns the wrapped model; `convert_checkpoint` writes it with a card naming the source.
Formats, key layouts and noise conventions of each family: docs/models.md#upstream-checkpoints.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from restore.engine.checkpoints import save_model


@dataclass(frozen=True)
class Converter:
    """``read(src, **options) -> wrapped model``; ``options`` are the family's documented keyword arguments."""

    read: Callable[..., nn.Module]
    description: str


CONVERTERS: dict[str, Converter] = {}


def register_converter(name: str, read: Callable[..., nn.Module], description: str) -> None:
    if name in CONVERTERS:
        raise ValueError(f"converter {name!r} is already registered")
    CONVERTERS[name] = Converter(read, description)


def convert_checkpoint(src: str | Path, dst: str | Path, fmt: str, *, dtype: torch.dtype | None = None,
                       card: dict[str, Any] | None = None, **options: Any) -> Path:
    """Convert the upstream checkpoint ``src`` (family ``fmt``) to a ``bcm-restore/1`` safetensors file ``dst``."""
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; supported: {', '.join(sorted(CONVERTERS))}")
    read = CONVERTERS[fmt].read
    accepted = [name for name, p in inspect.signature(read).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"format {fmt!r} takes no option {', '.join(unknown)}; its options: {', '.join(accepted)}")
    model = read(src, **options)
    card = {"source": str(Path(src).name), "source_format": fmt, **(card or {})}
    return save_model(model, dst, dtype=dtype, card=card)


# Importing the family modules registers them.
from restore.engine.convert import bcm_ict, edm_pkl, guided_diffusion, i2sb, openai_cm  # noqa: E402,F401

__all__ = ["CONVERTERS", "Converter", "convert_checkpoint", "register_converter"]
