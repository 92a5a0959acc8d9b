"""Network backbones, by name: "adm" is the ADM UNet used by BCM / iCT / EDM models (see `unet.py`); "song" is
NVlabs EDM's DDPM++ / NCSN++ ``SongUNet`` of its CIFAR-10 / FFHQ / AFHQv2 pickles (see `songunet.py`).

A checkpoint names its backbone in the ``network`` metadata key (absent: "adm") and stores the backbone's
config as JSON; `build_network` turns the pair back into a module. A backbone class exposes ``config_class``
(with ``from_dict`` / ``to_dict``) and keeps its config as ``.config``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from restore.engine.networks.songunet import SONG_PRESETS, SongUNet, SongUNetConfig
from restore.engine.networks.unet import PRESETS, UNet, UNetConfig, count_parameters

NETWORKS: dict[str, type[nn.Module]] = {"adm": UNet, "song": SongUNet}


def network_name(net: nn.Module) -> str:
    """The registered name of ``net``'s class; ValueError for an unregistered backbone."""
    for name, cls in NETWORKS.items():
        if type(net) is cls:
            return name
    raise ValueError(f"{type(net).__qualname__} is not a registered backbone; known: {sorted(NETWORKS)}")


def build_network(name: str, config: dict[str, Any]) -> nn.Module:
    """The backbone ``name`` built from its config dict (call under ``torch.device("meta")`` to allocate nothing)."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; known: {sorted(NETWORKS)}")
    cls = NETWORKS[name]
    return cls(cls.config_class.from_dict(config))


__all__ = ["NETWORKS", "PRESETS", "SONG_PRESETS", "SongUNet", "SongUNetConfig", "UNet", "UNetConfig", "build_network",
           "count_parameters", "network_name"]
