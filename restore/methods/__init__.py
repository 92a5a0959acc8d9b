"""Restoration methods: the registry (`restore.methods.registry`) and the methods that need only ``restore``'s
engine: BCM invert-regenerate restoration (`restore.methods.bcm`), exact-inversion restoration
(`restore.methods.inversion`) and the model-free references (`restore.methods.plain`). The baselines register
into the same registry from :mod:`baselines`.
"""

from restore.methods.registry import Choice, Float, Method, get_method, list_methods, register_method

__all__ = ["Choice", "Float", "Method", "get_method", "list_methods", "register_method"]
