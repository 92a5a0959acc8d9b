"""Operator registry: names -> classes, spec parsing (``name[:key=value,...]``) and listing."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from operators.base import REQUIRED, Operator

_REGISTRY: dict[str, type[Operator]] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def register_operator(name: str):
    """Class decorator registering an :class:`Operator` subclass under ``name`` (lowercase identifier)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"operator name must match {_NAME.pattern!r}, got {name!r}")

    def decorate(cls: type[Operator]) -> type[Operator]:
        if not (isinstance(cls, type) and issubclass(cls, Operator)):
            raise TypeError(f"register_operator({name!r}) expects an Operator subclass, got {cls!r}")
        if name in _REGISTRY:
            raise ValueError(f"operator {name!r} is already registered (by {_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _lookup(name: str) -> type[Operator]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown operator {name!r}; valid operators: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"down:factor=4,kernel=bicubic"`` -> ``("down", {"factor": "4", "kernel": "bicubic"})``."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    cls = _lookup(name)
    params: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(
                f"operator spec {spec!r}: expected key=value, got {item!r}; "
                f"valid parameters: {'; '.join(p.describe() for p in cls.parameters())}"
            )
        if key in params:
            raise ValueError(f"operator spec {spec!r}: parameter {key!r} given twice")
        params[key] = value
    return name, params


def build_operator(spec: str | tuple[str, Mapping[str, Any]] | Operator) -> Operator:
    """Build an operator from ``"name[:key=value,...]"`` or ``(name, params)``.

    Unknown names, keys or bad values raise ``ValueError`` listing the valid choices. An
    :class:`Operator` is returned as is. Example: ``build_operator("down:factor=4,kernel=bicubic")``.
    """
    if isinstance(spec, Operator):
        return spec
    if isinstance(spec, str):
        name, params = parse_spec(spec)
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        name, params = spec[0], dict(spec[1])
    else:
        raise ValueError(f"operator spec must be 'name[:key=value,...]' or (name, params), got {spec!r}")
    return _lookup(name)(**params)


def list_operators() -> dict[str, dict[str, Any]]:
    """Registered operators: name -> ``{"description", "linear", "params": {name: {type, default, help, ...}}}``."""
    out = {}
    for name in sorted(_REGISTRY):
        cls = _REGISTRY[name]
        out[name] = {
            "description": cls.describe(),
            "linear": cls.linear,
            "params": {
                p.name: {
                    "type": p.kind.__name__,
                    "default": None if p.default is REQUIRED else p.default,
                    "required": p.default is REQUIRED,
                    "help": p.help,
                    **({"choices": list(p.choices)} if p.choices else {}),
                    **({"range": [p.low, p.high]} if p.low is not None or p.high is not None else {}),
                }
                for p in cls.parameters()
            },
        }
    return out
