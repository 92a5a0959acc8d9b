"""Degradation operators: JPEG, box inpainting (fixed / random box) and downsampling.

Build one from a spec string, e.g. ``build_operator("jpeg:quality=10")``, ``"box:size=16"``,
``"randbox:size=8"``, ``"down:factor=4,kernel=bicubic"``, optionally with ``noise=SIGMA`` (Gaussian
measurement noise in [-1, 1] units); ``list_operators()`` describes what is registered. The contract
every operator follows is documented in :mod:`operators.base`.
"""

from operators.base import Operator, Param
from operators.down import Downsample
from operators.jpeg import JPEG, quantization_tables
from operators.masks import Box, RandBox
from operators.registry import build_operator, list_operators, parse_spec, register_operator

__all__ = [
    "JPEG",
    "Box",
    "Downsample",
    "Operator",
    "Param",
    "RandBox",
    "build_operator",
    "list_operators",
    "parse_spec",
    "quantization_tables",
    "register_operator",
]
