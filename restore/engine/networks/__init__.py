"""Network backbones: the ADM UNet used by BCM / iCT / EDM models (see `unet.py`)."""

from restore.engine.networks.unet import PRESETS, UNet, UNetConfig, count_parameters

__all__ = ["PRESETS", "UNet", "UNetConfig", "count_parameters"]
