"""The registry of restoration methods shared by `restore run`, Python users and the benchmark
(docs/design.md#the-method-contract).

A method is one function ``restore_<name>(model, y, op, *, nfe, generator=None, callback=None, class_labels=None,
**hparams) -> x_hat`` (images in [-1, 1]) registered with :func:`register_method`, which records what the CLI and
the benchmark need to know about it: whether it is blind (never evaluates ``op``, only uses it to know the
task), which operators it supports, which model wrapper it needs and its default NFE.

Methods outside ``restore`` (the baselines, third-party packages) register the same way and are found
through the entry-point group ``bcm_restore.methods``: every module listed there is imported the first
time the registry is read, so ``restore`` never imports ``baselines`` (docs/design.md#layers).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from restore.engine.plugins import load_plugins

NO_MODEL = "none"  # the ``model`` of a method that needs no network


@dataclass(frozen=True)
class Float:
    """A real hyper-parameter searched in [low, high] (log-uniformly with ``log``)."""

    low: float
    high: float
    log: bool = False

    def describe(self) -> dict[str, Any]:
        return {"type": "float", "low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class Choice:
    """A hyper-parameter searched among ``choices``."""

    choices: tuple

    def describe(self) -> dict[str, Any]:
        return {"type": "choice", "choices": list(self.choices)}


@dataclass(frozen=True)
class Method:
    """A registered restoration method and what callers need to know to run it."""

    name: str
    fn: Callable[..., Any]
    blind: bool
    operators: tuple[str, ...] | None  # operator names it supports; None: any operator
    model: str  # the registered wrapper name it needs (`restore.engine.wrappers`), or NO_MODEL
    default_nfe: int
    description: str
    needs_grad: bool = False  # uses autograd (DPS-style guidance): callers must not run it in inference_mode
    # The hyper-parameters a tuner may search, declared next to the method's code (keyword -> Float | Choice);
    # tuned per (operator, NFE) cell, so levels that depend on the budget are searched per budget.
    space: Mapping[str, Float | Choice] = field(default_factory=dict)

    def supports(self, op) -> bool:
        """Whether the method handles operator ``op`` (by its registered name)."""
        return self.operators is None or op.name in self.operators

    def __call__(self, model, y, op, *, nfe: int | None = None, generator=None, callback=None, class_labels=None,
                 **hparams):
        if not self.supports(op):
            raise ValueError(f"method {self.name!r} does not support operator {op.name!r}; "
                             f"it supports: {', '.join(self.operators)}")
        nfe = self.default_nfe if nfe is None else nfe
        return self.fn(model, y, op, nfe=nfe, generator=generator, callback=callback, class_labels=class_labels,
                       **hparams)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "blind": self.blind, "operators": list(self.operators) if self.operators else "any",
                "model": self.model, "default_nfe": self.default_nfe, "needs_grad": self.needs_grad,
                "space": {k: v.describe() for k, v in self.space.items()}, "description": self.description}


_METHODS: dict[str, Method] = {}


def register_method(name: str, *, blind: bool, model: str, operators: tuple[str, ...] | None = None,
                    default_nfe: int = 2, description: str | None = None, needs_grad: bool = False,
                    space: Mapping[str, Float | Choice] | None = None) -> Callable:
    """Decorator registering ``fn`` as method ``name``; the description defaults to the docstring's first line.
    ``space``: the searchable hyper-parameters (keyword arguments of ``fn``), see :class:`Method`."""
    if not model or not isinstance(model, str):
        raise ValueError(f"model must be a wrapper name or {NO_MODEL!r}, got {model!r}")

    def decorate(fn: Callable) -> Callable:
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].fn.__module__}")
        text = description or (fn.__doc__ or "").strip().split("\n")[0]
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        # The contract: labels reach every model call (restore.engine.wrappers.class_conditioning).
        if "class_labels" not in params and not takes_any:
            raise ValueError(f"method {name!r}: {fn.__name__} must take the keyword class_labels (None for "
                             "unconditional models; see restore.engine.wrappers.class_conditioning)")
        unknown = sorted(set(space or {}) - set(params))
        if unknown:
            raise ValueError(f"method {name!r}: search space names {', '.join(unknown)}, not keywords of {fn.__name__}")
        _METHODS[name] = Method(name, fn, blind, tuple(operators) if operators else None, model, default_nfe, text,
                                needs_grad, dict(space or {}))
        return fn

    return decorate


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError listing the registered names otherwise."""
    load_plugins()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS)) or '(none)'}")
    return _METHODS[name]


def list_methods() -> list[dict[str, Any]]:
    """Every registered method as a dict (name, blind, operators, model, default_nfe, description), by name."""
    load_plugins()
    return [_METHODS[name].describe() for name in sorted(_METHODS)]
