"""Supervised training pairs made on the fly, and the losses of the conditional baselines (Palette, I2SB).

The training loop hands every loss clean images and the step's generator (``loss.terms(model, x, step=,
generator=)``); the losses here turn them into (clean, degraded) pairs with the operator the model is trained
for, ``op = op.draw(x.shape, generator)`` and ``y = op.measure(x, generator)`` (random boxes and measurement
noise from the step's generator, so resumed runs see the same pairs), then X_1 / the condition =
``baselines.palette.degraded_image(op, y, generator)`` (A^+ y at full size, masked holes filled with noise).
Random draws per step, in order: the pair (operator, hole fill), then the loss's own draws.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import torch

from baselines.i2sb import TASK_DEFAULTS, BridgeSchedule
from baselines.palette import degraded_image
from operators import Operator, build_operator
from operators.utils import Generator
from training.losses import EDMLoss, _draw_seed, _dropout_sync

__all__ = ["make_pair", "PaletteLoss", "I2SBLoss"]


def make_pair(op, x: torch.Tensor, generator: Generator = None) -> tuple[Operator, torch.Tensor, torch.Tensor]:
    """``(op, y, x1)``: the operator drawn for the batch (``op.draw``: random boxes), its measurement
    ``y = op.measure(x, generator)`` and the degraded image at full size."""
    op = op.draw(x.shape, generator, device=x.device)
    y = op.measure(x, generator)
    return op, y, degraded_image(op, y, generator)


class _PairedLoss:
    """Operator handling shared by the paired losses (the dataclass field ``operator`` holds the spec)."""

    operator: str

    def _canonical_operator(self) -> None:
        object.__setattr__(self, "operator", build_operator(self.operator).spec)

    @cached_property
    def op(self):
        return build_operator(self.operator)

    def _check_model(self, model, **settings) -> None:
        expected = {"operator": self.operator, **settings}
        found = {k: getattr(model, k, None) for k in expected}
        if found != expected:
            raise ValueError(f"{type(self).__name__} is set up for {expected} but the model has {found}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PaletteLoss(_PairedLoss):
    """Palette training (Saharia et al. 2022) with the EDM loss: ``EDMLoss`` (Karras et al. 2022, Eq. 8) of a
    ``baselines.palette.Palette`` denoiser conditioned on the degraded image, ``cond = degraded_image(op, y)``.
    Returns ``{"edm": (B,)}``."""

    operator: str
    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self):
        self._canonical_operator()

    def terms(self, model, x: torch.Tensor, *, step: int = 0, generator: Generator = None) -> dict[str, torch.Tensor]:
        self._check_model(model)
        _, _, cond = make_pair(self.op, x, generator)
        return EDMLoss(self.p_mean, self.p_std).terms(model, x, step=step, generator=generator, cond=cond)

    def __call__(self, model, x: torch.Tensor, *, step: int = 0, generator: Generator = None) -> torch.Tensor:
        return self.terms(model, x, step=step, generator=generator)["edm"]


@dataclass(frozen=True)
class I2SBLoss(_PairedLoss):
    """I2SB training (Liu et al. 2023, Algorithm 1; docs/methods.md#i2sb): n ~ U{0..N-1}, X_n from the bridge
    marginal between X_0 = x and X_1 = degraded_image(op, y) (its mean only with ``ot_ode``), and the per-sample
    mean squared error of eps_theta(X_n, n) against (X_n - X_0) / sigma_n -- on the hole only for masking operators
    (upstream multiplies prediction and label by the mask; the mean still runs over all pixels).
    ``beta_max`` / ``ot_ode`` default to the task's (``baselines.i2sb.TASK_DEFAULTS``) and must match the model.
    Returns ``{"i2sb": (B,)}``."""

    operator: str
    beta_max: float | None = None
    interval: int = 1000
    ot_ode: bool | None = None

    def __post_init__(self):
        self._canonical_operator()
        beta_max, ot_ode = TASK_DEFAULTS.get(self.op.name, (0.3, False))
        if self.beta_max is None:
            object.__setattr__(self, "beta_max", beta_max)
        if self.ot_ode is None:
            object.__setattr__(self, "ot_ode", ot_ode)

    @cached_property
    def schedule(self) -> BridgeSchedule:
        return BridgeSchedule(self.beta_max, self.interval)

    def terms(self, model, x: torch.Tensor, *, step: int = 0, generator: Generator = None) -> dict[str, torch.Tensor]:
        self._check_model(model, ot_ode=self.ot_ode)
        if model.schedule != self.schedule:
            raise ValueError(f"I2SBLoss uses {self.schedule} but the model has {model.schedule}")
        op, _, x1 = make_pair(self.op, x, generator)
        seed = _draw_seed(generator, x.device)
        gen_device = generator.device if generator is not None else x.device
        n = torch.randint(0, self.interval, (x.shape[0],), generator=generator, device=gen_device).cpu()
        x_n = self.schedule.marginal(n, x, x1, generator, self.ot_ode)
        label = (x_n - x) / self.schedule.at("std_fwd", n, x)
        with _dropout_sync(model, seed):
            err = (model.predict_eps(x_n, n) - label).square()
        if hasattr(op, "mask_for"):
            err = err * (~op.mask_for(err)).to(err.dtype)
        return {"i2sb": err.flatten(1).mean(1)}

    def __call__(self, model, x: torch.Tensor, *, step: int = 0, generator: Generator = None) -> torch.Tensor:
        return self.terms(model, x, step=step, generator=generator)["i2sb"]
