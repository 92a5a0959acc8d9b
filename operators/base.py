"""The operator contract shared by every degradation (docs/design.md#operators).

An operator is a plain object (no ``nn.Module``: it has no learnable state) built from a spec such as
``jpeg:quality=10``. It works on images ``(B, C, H, W)`` in ``[-1, 1]`` on any device, in float32 or
float64, and returns tensors of the input's device and dtype:

* ``op(x)`` the clean forward map ``A(x)``; ``op.linear`` says whether ``A`` is linear;
* ``op.draw(shape, generator)`` the operator that measures a batch of ``shape``: ``op`` itself, except
  for operators with a random structure (``op.random``: ``randbox``, ``randmask``), which draw it from
  ``generator`` and return a new operator holding it; measure with the drawn operator and restore with it;
* ``op.measure(x, generator)`` ``A(x)`` plus the configured Gaussian measurement noise
  (``noise=SIGMA``, in [-1, 1] units, drawn with :func:`operators.utils.randn`);
* ``op.project(x, y)`` hard data consistency: the image closest to ``x`` that ``A`` maps to ``y`` (linear
  operators: to ``A A^+ y``, the part of ``y`` in the range, where measurement noise leaves the range);
* linear operators add ``op.adjoint(y)`` (the true adjoint) and ``op.pinv(y)`` (the Moore-Penrose inverse:
  ``A A^+ y = y`` on the range of ``A``);
* ``op.output_shape(shape)``, ``op.name``, ``op.params`` (resolved parameters) and ``op.spec``
  (canonical spec string; ``build_operator(op.spec)`` rebuilds an equal operator).

Operators do not change after construction: whatever is random about them is drawn into a new
operator by ``draw``, never kept in the one that drew it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from operators.utils import Generator, randn


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """One operator parameter: type, default (or :data:`REQUIRED`), range / choices and a help line."""

    name: str
    kind: type  # int, float or str
    default: Any = REQUIRED
    help: str = ""
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    nullable: bool = False  # default None means "derived" (e.g. a centred box)

    def describe(self) -> str:
        """e.g. ``quality: int in [1, 100], required``."""
        if self.choices:
            dom = "one of " + "|".join(self.choices)
        else:
            dom = self.kind.__name__
            if self.low is not None and self.high is not None:
                dom += f" in [{self.low:g}, {self.high:g}]"
            elif self.low is not None:
                dom += f" >= {self.low:g}"
        default = "required" if self.default is REQUIRED else f"default {self.default}"
        return f"{self.name}: {dom}, {default}"

    def parse(self, value: Any, op_name: str) -> Any:
        """Validate ``value`` (a string from a spec or a Python value) and return it typed."""
        if value is None and self.nullable:
            return None
        bad = ValueError(f"operator {op_name!r}: bad value {value!r} for parameter {self.describe()}")
        if self.kind is str:
            if not isinstance(value, str) or value not in (self.choices or (value,)):
                raise bad
            return value
        if isinstance(value, bool):
            raise bad
        try:
            if isinstance(value, str):
                value = self.kind(value.strip())
            elif self.kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise bad
                value = int(value)
            else:
                value = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if self.kind is float and not math.isfinite(value):
            raise bad
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise bad
        return value

    def format(self, value: Any) -> str:
        return repr(value) if self.kind is float else str(value)


NOISE = Param("noise", float, 0.0, "std of additive Gaussian measurement noise, [-1, 1] units", low=0.0)


class Operator:
    """Base class of all degradation operators (see the module docstring for the contract).

    Subclasses set ``linear`` and ``PARAMS``, implement :meth:`forward`, :meth:`project` (non-linear)
    or :meth:`adjoint` and :meth:`pinv` (linear), and are registered with
    :func:`operators.register_operator`, which sets ``name``. Every operator also accepts ``noise``.
    """

    name: ClassVar[str] = ""
    linear: ClassVar[bool] = False
    random: ClassVar[bool] = False  # draw draws a random structure (a new operator per batch)
    PARAMS: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = self.resolve_params(params)
        self.noise: float = self.params["noise"]

    # -- parameters and spec ---------------------------------------------------------------------
    @classmethod
    def parameters(cls) -> tuple[Param, ...]:
        return (*cls.PARAMS, NOISE)

    @classmethod
    def describe(cls) -> str:
        """One-line description: the first line of the class docstring."""
        return next(iter((cls.__doc__ or "").strip().splitlines()), "")

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``params`` against :meth:`parameters` and fill in defaults (ValueError lists choices)."""
        known = {p.name: p for p in cls.parameters()}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(
                f"operator {cls.name!r}: unknown parameter(s) {', '.join(unknown)}; "
                f"valid parameters: {'; '.join(p.describe() for p in known.values())}"
            )
        missing = [p for p in known.values() if p.default is REQUIRED and p.name not in params]
        if missing:
            raise ValueError(
                f"operator {cls.name!r}: missing required parameter(s) {', '.join(p.name for p in missing)}; "
                f"valid parameters: {'; '.join(p.describe() for p in known.values())}"
            )
        return {n: p.parse(params[n], cls.name) if n in params else p.default for n, p in known.items()}

    @property
    def spec(self) -> str:
        """Canonical spec: required parameters always, the others only where they differ from the default."""
        parts = [
            f"{p.name}={p.format(self.params[p.name])}"
            for p in self.parameters()
            if p.default is REQUIRED or self.params[p.name] != p.default
        ]
        return self.name + (":" + ",".join(parts) if parts else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params == self.params

    def __hash__(self) -> int:
        return hash(self.spec)

    # -- the operator ----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of ``op(x)`` for ``x`` of ``input_shape``."""
        return tuple(input_shape)

    def draw(self, shape: Sequence[int], generator: Generator = None, device=None) -> Operator:
        """The operator that measures images of ``shape`` (B, C, H, W): ``self`` unless the operator has a
        random structure, which is then drawn from ``generator`` (one or one per image) before any noise."""
        return self

    def measure(self, x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """``A(x) + noise * z``, ``z ~ N(0, I)`` drawn per image from ``generator`` (no draw when noise = 0)."""
        y = self(x)
        if self.noise > 0:
            y = y + self.noise * randn(y.shape, generator, device=y.device, dtype=y.dtype)
        return y

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"operator {self.spec!r} is not linear: it has no adjoint")

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"operator {self.spec!r} is not linear: it has no pseudo-inverse")

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Linear operators: ``x + A^+(y - A x)``, the exact orthogonal projection of ``x`` onto
        ``{x' : A x' = A A^+ y}`` (``= y`` for ``y`` in the range; the DDNM range-null-space step, Wang et al.
        2023, Eq. 7)."""
        if not self.linear:
            raise NotImplementedError
        return x + self.pinv(y - self(x))
