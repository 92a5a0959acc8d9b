"""Baseline restoration methods the field compares with (I2SB, Palette, DPS, PiGDM, DDRM, DDNM).

Each is written against the same operator and model contracts as the BCM restorers in :mod:`restore`,
so comparisons use the same data, backbone and NFE accounting.
"""

from baselines import ddnm, ddrm, dps, i2sb, palette, pigdm  # noqa: F401 -- importing registers the methods (and wrappers)
