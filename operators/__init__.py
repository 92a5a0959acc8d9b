"""Degradation operators: JPEG, inpainting (fixed / random box, random pixels), downsampling and Gaussian blur.

Build one from a spec string, e.g. ``build_operator("jpeg:quality=10")``, ``"box:size=16"``,
``"randbox:size=8"``, ``"randmask:p=0.7"``, ``"down:factor=4,kernel=bicubic"``, ``"blur:sigma=3.0,size=61"``,
optionally with ``noise=SIGMA`` (Gaussian measurement noise in [-1, 1] units); ``list_operators()`` describes
what is registered. The contract every operator follows is documented in :mod:`operators.base`.
"""

from operators.base import Operator, Param
from operators.blur import GaussianBlur
from operators.down import Downsample
from operators.jpeg import JPEG, quantization_tables
from operators.masks import Box, RandBox, RandMask
from operators.registry import build_operator, list_operators, parse_spec, register_operator

__all__ = [
    "JPEG",
    "Box",
    "Downsample",
    "GaussianBlur",
    "Operator",
    "Param",
    "RandBox",
    "RandMask",
    "build_operator",
    "list_operators",
    "parse_spec",
    "quantization_tables",
    "register_operator",
]
