"""I2SB: Image-to-Image Schrödinger Bridge (Liu, Vahdat, Huang, Theodorou, Nie, Anandkumar; ICML 2023;
arXiv 2302.05872).

A supervised bridge from the degraded image X_1 to the clean image X_0, one model per degradation
(docs/methods.md#i2sb; code: NVlabs/I2SB ``i2sb/diffusion.py``, ``i2sb/runner.py``). Everything lives in I2SB's own
discrete time n = 0..N-1 (docs/design.md#conventions: the adapter to the project's sigma-conditioned network is here,
next to the model, and no API mixes indices and sigmas):

* schedule (§2.1, :class:`BridgeSchedule`): beta_n linear in sqrt(beta) from 1e-4 to beta_max / N, first half kept
  and mirrored (symmetric); sigma_n^2 = sum_{k<=n} beta_k, sigma-bar_n^2 = sum_{k>=n} beta_k;
* bridge marginal (``q_sample``): X_n | X_0, X_1 ~ N(mu0_n X_0 + mu1_n X_1, Sigma_n I) with
  mu0 = sigma-bar^2 / (sigma^2 + sigma-bar^2), mu1 = sigma^2 / (sigma^2 + sigma-bar^2),
  Sigma = sigma^2 sigma-bar^2 / (sigma^2 + sigma-bar^2); OT-ODE (the paper's noise-free limit) drops the noise;
* training (§2.2, Algorithm 1; ``training.paired.I2SBLoss``): n ~ U{0..N-1}, eps_theta(X_n, n) regresses
  (X_n - X_0) / sigma_n with MSE (inpainting: on the hole only); x0_hat = X_n - sigma_n eps_theta;
* sampling (§2.3, Algorithm 2; ``ddpm_sampling`` / ``p_posterior``): NFE + 1 evenly spaced indices, start at
  X_{N-1} = X_1, then for n -> m the DDPM posterior of the forward Brownian motion
  X_m = (delta^2 / sigma_n^2) x0_hat + (sigma_m^2 / sigma_n^2) X_n + sqrt(sigma_m^2 delta^2 / sigma_n^2) z,
  delta^2 = sigma_n^2 - sigma_m^2, no noise when m = 0 (or with OT-ODE); the output is the state at n = 0
  (``xs[:, 0]``). Inpainting: after every step the observed pixels are replaced by X_1 plus the bridge noise of
  level m (none with OT-ODE).
* X_1 = ``baselines.palette.degraded_image``: A^+ y at full size, the hole of masking operators filled with
  N(0, I) noise (upstream: noise-filled hole). Per-task defaults (docs/methods.md#i2sb, ``scripts/train.sh``):
  beta_max = 0.3 for JPEG and super-resolution, 1.0 with OT-ODE for inpainting.

Deviations from the original:

* Network time input: models trained here get the project's noise label 250 ln sigma_n (a strictly increasing
  function of n) instead of upstream's rescaled index; same information, the embedding sees a different but monotone
  parametrisation. Converted upstream checkpoints (``restore convert --from i2sb``) are wrapped with
  ``noise_label="i2sb"``: upstream's ``noise_levels[n] = N (t0 + n (T - t0) / (N - 1))`` (t0 = 1e-4, T = 1).
* Backbone: the project's ADM UNet trained from scratch on the same data as the BCM (upstream fine-tunes the
  256x256 ADM ImageNet checkpoint), optimiser/EMA from the shared training loop.
* Super-resolution X_1 = A^+ y of the operator's kernel instead of nearest-neighbour upsampling; JPEG X_1 is the
  real (libjpeg) decoded image instead of upstream's PyTorch JPEG simulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from baselines.common import step_callback
from baselines.palette import degraded_image
from operators import build_operator
from operators.utils import Generator, randn
from restore.engine.wrappers import (
    SIGMA_DATA,
    _PreconditionedModel,
    append_dims,
    check_operator,
    check_range,
    class_conditioning,
    register_wrapper,
)
from restore.methods import Choice, register_method

I2SB_OPERATORS = ("jpeg", "box", "randbox", "down")
# Per-task bridge settings of the paper's scripts (docs/methods.md#i2sb): (beta_max, OT-ODE).
TASK_DEFAULTS = {"jpeg": (0.3, False), "down": (0.3, False), "box": (1.0, True), "randbox": (1.0, True)}


def space_indices(num_steps: int, count: int) -> list[int]:
    """``count`` evenly spaced integers from 0 to ``num_steps - 1`` (upstream ``util.space_indices``)."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"need 1 <= count <= {num_steps}, got {count}")
    stride = (num_steps - 1) / (count - 1) if count > 1 else 1
    return [round(i * stride) for i in range(count)]


@dataclass(frozen=True)
class BridgeSchedule:
    """I2SB's symmetric beta schedule and the bridge coefficients, float64 tensors of shape (N,) indexed by n."""

    beta_max: float = 0.3
    interval: int = 1000  # N
    beta_min: float = 1e-4

    def __post_init__(self):
        if self.interval < 2 or self.interval % 2:
            raise ValueError(f"interval must be an even number >= 2 (the schedule mirrors its first half), "
                             f"got {self.interval}")
        if not (self.beta_min > 0 and self.beta_max > 0):
            raise ValueError(f"need beta_min > 0 and beta_max > 0, got {self.beta_min}, {self.beta_max}")

    @cached_property
    def betas(self) -> torch.Tensor:
        n = self.interval
        ramp = torch.linspace(self.beta_min**0.5, (self.beta_max / n) ** 0.5, n, dtype=torch.float64) ** 2
        half = ramp[: n // 2]
        return torch.cat([half, half.flip(0)])

    @cached_property
    def std_fwd(self) -> torch.Tensor:
        """sigma_n = sqrt(sum_{k<=n} beta_k)."""
        return self.betas.cumsum(0).sqrt()

    @cached_property
    def std_bwd(self) -> torch.Tensor:
        """sigma-bar_n = sqrt(sum_{k>=n} beta_k)."""
        return self.betas.flip(0).cumsum(0).flip(0).sqrt()

    @cached_property
    def mu_x0(self) -> torch.Tensor:
        return self.std_bwd**2 / (self.std_fwd**2 + self.std_bwd**2)

    @cached_property
    def mu_x1(self) -> torch.Tensor:
        return self.std_fwd**2 / (self.std_fwd**2 + self.std_bwd**2)

    @cached_property
    def std_sb(self) -> torch.Tensor:
        """sqrt(Sigma_n), the bridge marginal's standard deviation."""
        return (self.std_fwd**2 * self.std_bwd**2 / (self.std_fwd**2 + self.std_bwd**2)).sqrt()

    def at(self, name: str, n, like: torch.Tensor) -> torch.Tensor:
        """Coefficient ``name`` at indices ``n`` (int or (B,)), broadcastable against ``like`` and in its dtype."""
        n = torch.as_tensor(n, dtype=torch.long).cpu()
        if ((n < 0) | (n >= self.interval)).any():
            raise ValueError(f"bridge index out of range [0, {self.interval}): {n.tolist()}")
        table = getattr(self, name)
        if n.ndim == 0:  # one level, filled on the device: copying it from the host syncs CUDA at every step
            return torch.full((), float(table[n]), dtype=like.dtype, device=like.device)
        return append_dims(table[n].to(device=like.device, dtype=like.dtype), like.ndim)

    def marginal(self, n, x0: torch.Tensor, x1: torch.Tensor, generator: Generator = None,
                 ot_ode: bool = False) -> torch.Tensor:
        """A draw of X_n | X_0, X_1 (``q_sample``); the mean alone with ``ot_ode``."""
        x = self.at("mu_x0", n, x0) * x0 + self.at("mu_x1", n, x0) * x1
        if not ot_ode:
            x = x + self.at("std_sb", n, x0) * randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        return x

    def posterior(self, n: int, m: int, x_n: torch.Tensor, x0: torch.Tensor, generator: Generator = None,
                  ot_ode: bool = False) -> torch.Tensor:
        """X_m ~ p(X_m | X_n, X_0) for m < n: the DDPM posterior of the forward process (``p_posterior``);
        no noise at m = 0 or with ``ot_ode``."""
        if not 0 <= m < n < self.interval:
            raise ValueError(f"need 0 <= m < n < {self.interval}, got m={m}, n={n}")
        var_n, var_m = float(self.std_fwd[n]) ** 2, float(self.std_fwd[m]) ** 2
        delta = var_n - var_m
        x = (delta / var_n) * x0 + (var_m / var_n) * x_n
        if m > 0 and not ot_ode:
            x = x + (var_m * delta / var_n) ** 0.5 * randn(x.shape, generator, device=x.device, dtype=x.dtype)
        return x

    def sample_steps(self, nfe: int) -> list[int]:
        """The nfe + 1 indices of an ``nfe``-step sampler, ascending from 0 to N - 1."""
        if not 1 <= nfe < self.interval:
            raise ValueError(f"I2SB needs 1 <= nfe <= {self.interval - 1} (interval N = {self.interval}), got {nfe}")
        return space_indices(self.interval, nfe + 1)


class I2SB(_PreconditionedModel):
    """I2SB network wrapper in bridge time: ``model.predict_eps(x, n)`` = eps_theta(X_n, n) and
    ``model(x, n) -> x0_hat = x - sigma_n eps_theta`` for integer indices n (int or (B,)).

    ``operator``: the degradation it is trained for; ``beta_max`` / ``ot_ode`` default to the task's
    (:data:`TASK_DEFAULTS`); ``interval`` = N. ``sigma_min`` / ``sigma_max`` are the schedule's sigma_0 and
    sigma_{N-1} (given ones, e.g. from a checkpoint, must agree); ``sigma_data`` is unused.
    ``noise_label``: the network's time input, "250log" (250 ln sigma_n, models trained here) or "i2sb" (upstream's
    ``noise_levels[n] = N (t0 + n (t_end - t0) / (N - 1))``, converted checkpoints). ``cond_x1``: the network also
    gets X_1 as extra input channels after X_n (upstream ``--cond-x1``).
    """

    kind = "i2sb"
    NOISE_LABELS = ("250log", "i2sb")

    def __init__(self, net, *, operator: str, beta_max: float | None = None, interval: int = 1000,
                 ot_ode: bool | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
                 sigma_data: float = SIGMA_DATA, autocast_dtype: torch.dtype | None = None,
                 noise_label: str = "250log", t0: float = 1e-4, t_end: float = 1.0, cond_x1: bool = False):
        if noise_label not in self.NOISE_LABELS:
            raise ValueError(f"unknown I2SB noise_label {noise_label!r}; known: {', '.join(self.NOISE_LABELS)}")
        op = build_operator(operator)
        default_beta, default_ot = TASK_DEFAULTS.get(op.name, (0.3, False))
        schedule = BridgeSchedule(float(default_beta if beta_max is None else beta_max), int(interval))
        ends = check_range((sigma_min, sigma_max), (float(schedule.std_fwd[0]), float(schedule.std_fwd[-1])),
                           "the bridge schedule", rtol=1e-9)
        super().__init__(net, sigma_data=sigma_data, sigma_min=ends[0], sigma_max=ends[1],
                         autocast_dtype=autocast_dtype)
        self.operator = op.spec
        self.schedule = schedule
        self.ot_ode = bool(default_ot if ot_ode is None else ot_ode)
        self.cond_x1 = bool(cond_x1)
        self.noise_label, self.t0, self.t_end = noise_label, float(t0), float(t_end)
        if noise_label == "i2sb":
            self._label = _identity  # predict_eps passes the label itself
            n = schedule.interval
            self.noise_levels = n * torch.linspace(self.t0, self.t_end, n, dtype=torch.float64)

    def wrapper_config(self) -> dict:
        config = {"operator": self.operator, "beta_max": self.schedule.beta_max, "interval": self.schedule.interval,
                  "ot_ode": self.ot_ode}
        if self.noise_label != "250log":  # defaults stay out: older checkpoints keep their metadata (and hash)
            config.update(noise_label=self.noise_label, t0=self.t0, t_end=self.t_end)
        if self.cond_x1:
            config["cond_x1"] = True
        return config

    def extra_repr(self) -> str:
        return f"{self.wrapper_config()}, autocast_dtype={self.autocast_dtype}"

    def predict_eps(self, x: torch.Tensor, n, **cond) -> torch.Tensor:
        """eps_theta(X_n, n): the network at noise label 250 ln sigma_n, or upstream's ``noise_levels[n]`` (counted).
        With ``cond_x1`` pass ``cond=X_1``."""
        (x,) = self._prepare(x)
        if self.noise_label == "i2sb":
            n = torch.as_tensor(n, dtype=torch.long).cpu()
            self.schedule.at("std_fwd", n, x)  # range check
            time = self.noise_levels[n].to(device=x.device, dtype=x.dtype).reshape(-1)
        else:
            time = self.schedule.at("std_fwd", n, x).reshape(-1)
        return self._run_net(x, time, None, cond)

    def forward(self, x: torch.Tensor, n, **cond) -> torch.Tensor:
        (x,) = self._prepare(x)
        return x - self.schedule.at("std_fwd", n, x) * self.predict_eps(x, n, **cond)


def _identity(v: torch.Tensor) -> torch.Tensor:
    return v


register_wrapper(I2SB.kind, I2SB)


def i2sb_sample(model, x1: torch.Tensor, nfe: int, *, mask: torch.Tensor | None = None, ot_ode: bool = False,
                clip_denoise: bool = False, generator: Generator = None, callback=None,
                extra_args: dict | None = None) -> torch.Tensor:
    """I2SB's DDPM-bridge sampler (Algorithm 2; ``ddpm_sampling``) from X_{N-1} = ``x1`` to the state at n = 0 in
    ``nfe`` steps (exactly ``nfe`` network evaluations). ``mask`` (True = observed): replace the observed pixels by
    X_1 (+ bridge noise of the new level unless ``ot_ode``) after every step. ``clip_denoise``: clamp x0_hat to
    [-1, 1]. ``model`` is any ``model(x, n) -> x0_hat`` with a ``.schedule`` (an :class:`I2SB` or an oracle);
    ``extra_args``: further keyword arguments of every model call (class labels)."""
    schedule = model.schedule
    steps = schedule.sample_steps(nfe)[::-1]
    x = x1
    extra = {**(extra_args or {}), **({"cond": x1} if getattr(model, "cond_x1", False) else {})}
    for i, (n, m) in enumerate(zip(steps[:-1], steps[1:])):
        x0 = model(x, n, **extra)
        if clip_denoise:
            x0 = x0.clamp(-1, 1)
        step_callback(callback, x, i, float(schedule.std_fwd[n]), float(schedule.std_fwd[m]), x0)
        x = schedule.posterior(n, m, x, x0, generator, ot_ode)
        if mask is not None:
            known = x1 if ot_ode else x1 + float(schedule.std_sb[m]) * randn(x1.shape, generator, device=x1.device,
                                                                             dtype=x1.dtype)
            x = torch.where(mask.to(x.device), known, x)
    return x


@register_method("i2sb", blind=False, model="i2sb", operators=I2SB_OPERATORS, default_nfe=999,
                 space={"clip_denoise": Choice((False, True))})
def restore_i2sb(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None, callback=None,
                 class_labels=None, clip_denoise: bool = False) -> torch.Tensor:
    """I2SB (Liu et al. 2023): Schrödinger bridge from the degraded image, trained for this operator.

    Starts at X_1 = A^+ y (inpainting: hole filled with noise), ``nfe`` DDPM-bridge posterior steps (OT-ODE if the
    model was trained so); ``clip_denoise`` clamps x0_hat. Not blind: uses ``op.pinv`` and ``op.mask_for``.
    """
    check_operator(model, op)
    cond = class_conditioning(model, class_labels, y.shape[0], y.device)
    x1 = degraded_image(op, y, generator)
    return i2sb_sample(model, x1, nfe, mask=op.mask_for(x1) if hasattr(op, "mask_for") else None, ot_ode=model.ot_ode,
                       clip_denoise=clip_denoise, generator=generator, callback=callback, extra_args=cond)
