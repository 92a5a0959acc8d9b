"""Training losses: EDM denoising score matching, improved consistency training (iCT), bidirectional consistency
training (BCT) and bidirectional consistency distillation (BCD, BCT with an EDM teacher making the adjacent pair).

Every loss is a small frozen dataclass (its fields are the recipe, written next to every run) called as
``loss(model, x, *, step, generator=None, **cond) -> (B,)`` per-sample values; ``loss.terms(...)`` returns the
named parts (``{"ct": ..., "bct": ...}``) whose sum is the loss. ``model`` is a wrapper from
:mod:`restore.engine.wrappers` (``EDMDenoiser`` for :class:`EDMLoss`; ``ConsistencyModel`` / ``BCM`` for the consistency
losses), ``x`` clean images (B, C, H, W) in [-1, 1], ``step`` the optimiser step (drives the discretisation
curriculum), ``generator`` the only source of randomness (noise levels, noise, dropout seed).

Dropout: each loss draws one seed from ``generator`` and runs all its network passes inside
``model.net.dropout_seed(seed)``, so the online and target passes of a step see identical dropout masks
(docs/methods.md#bct) without touching the global RNG. Nets without ``dropout_seed`` are accepted only if they have no
active ``nn.Dropout``. A teacher (BCD) runs in eval mode, without dropout and without gradients.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torch.func import functional_call

from operators.utils import randn
from restore.engine.sampling import pf_ode_step
from restore.engine.schedules import karras_sigmas

__all__ = [
    "lognormal_interval_weights",
    "curriculum_num_points",
    "pseudo_huber",
    "ConsistencyLoss",
    "ICTLoss",
    "BCTLoss",
    "BCDLoss",
    "EDMLoss",
]


def lognormal_interval_weights(grid: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """Probability of each grid interval [t_k, t_{k+1}] under ln t ~ N(p_mean, p_std²), normalised to sum 1
    (Song & Dhariwal 2023, iCT Sec. 3.5; docs/methods.md#ict):
    p_k ∝ erf((ln t_{k+1} − p_mean)/(√2·p_std)) − erf((ln t_k − p_mean)/(√2·p_std)). Shape (N−1,)."""
    cdf = torch.special.erf((grid.log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def curriculum_num_points(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """Number of grid points N(k) of the iCT discretisation curriculum (iCT Eq. 5 "exponential" schedule;
    docs/methods.md#ict): K′ = ⌊K/(log₂(s1/s0) + 1)⌋, N(k) = min(s0·2^{⌊k/K′⌋}, s1) + 1."""
    k_prime = max(1, math.floor(total_steps / (math.log2(s1 / s0) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Per-sample pseudo-Huber distance (iCT Sec. 3.3), divided by √D like the official BCM code (docs/methods.md#bct):
    d(a, b) = (√(‖a − b‖² + c²) − c)/√D with D = C·H·W and, by default, c = 0.00054·√D.

    The division is a global scale only (Adam is invariant to it); it keeps loss values comparable across
    resolutions. Returns (B,)."""
    dim = a[0].numel()
    if c is None:
        c = 0.00054 * math.sqrt(dim)
    sq = (a - b).square().flatten(1).sum(1)
    return ((sq + c * c).sqrt() - c) / math.sqrt(dim)


def _target(model, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """f_{θ⁻}(x, t, σ_min) with θ⁻ = stop-grad(θ) (target EMA 0, docs/methods.md#ict).

    The weights are detached but the call is *not* under no_grad: gradients flow into ``x`` (the BCT term needs
    them, docs/methods.md#bct) and never into the weights."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    return functional_call(model, params, (x, t), cond)


def _draw_seed(generator: torch.Generator | None, device) -> int:
    gen_device = generator.device if generator is not None else device
    return int(torch.randint(0, 2**62, (), generator=generator, device=gen_device))


def _dropout_sync(model, seed: int):
    """``model.net.dropout_seed(seed)``; nets without it (oracles, stand-ins) are fine only without active dropout."""
    sync = getattr(model.net, "dropout_seed", None)
    if sync is not None:
        return sync(seed)
    if model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.net.modules()):
        raise ValueError("the network uses dropout but has no dropout_seed(seed) to synchronise its masks")
    return contextlib.nullcontext()


def _bshape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class ConsistencyLoss:
    """Consistency training without a teacher (iCT, Song & Dhariwal 2023, Eq. 7 with Sec. 3.3-3.5), optionally
    plus the bidirectional term of BCT (Li & He 2024, docs/methods.md#bct). :class:`ICTLoss` and :class:`BCTLoss` only
    change the defaults.

    Per sample (docs/methods.md#bct):
      1. grid t_0 < … < t_{N−1} (Karras, ρ), N = :meth:`num_points` (curriculum or fixed);
      2. interval n ~ lognormal weights p (without the last interval if ``exclude_last_interval``),
         t = t_{n+1}, t′ = t_n; the adjacent pair (:meth:`adjacent_pair`): x_t = x + t·z, x_{t′} = x + t′·z with the
         same z (consistency training; :class:`BCDLoss` makes x_{t′} with a teacher instead);
      3. CT: λ·d(f_θ(x_t, t, σ_min), y*), y* = f_{θ⁻}(x_{t′}, t′, σ_min) detached, λ = 1/(t − t′);
      4. BCT (``bidirectional``): m ~ p over all intervals with m ≠ n+1, u = t_m (below or above t);
         λ′·d(f_{θ⁻}(f_θ(x_t, t, u), u, σ_min), y*), λ′ = 1/|u − t|; gradient through θ⁻'s input only.
    d is :func:`pseudo_huber`. Random draws in this order: dropout seed, n, z, then m — so the CT term of a
    bidirectional loss equals the non-bidirectional loss for the same generator state.
    """

    total_steps: int = 800_000  # K, curriculum length in optimiser steps
    s0: int = 10  # initial number of discretisation intervals
    s1: int = 1280  # final number of discretisation intervals
    fixed_scales: int | None = None  # fine-tuning: N = fixed_scales + 1 for every step (BCF uses 320)
    rho: float = 7.0
    p_mean: float = -1.1
    p_std: float = 2.0
    huber_c: float | None = None  # None: 0.00054·√D
    bidirectional: bool = True
    exclude_last_interval: bool = True  # BCM excludes t = σ_max from the CT pair; iCT keeps it

    def __post_init__(self):
        if self.fixed_scales is None and not (1 <= self.s0 <= self.s1):
            raise ValueError(f"need 1 <= s0 <= s1, got s0={self.s0}, s1={self.s1}")
        if self.fixed_scales is not None and self.fixed_scales < 2:
            raise ValueError(f"fixed_scales must be >= 2, got {self.fixed_scales}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")

    def to_dict(self) -> dict:
        return asdict(self)

    def num_points(self, step: int) -> int:
        """Grid size N at optimiser ``step``."""
        if self.fixed_scales is not None:
            return self.fixed_scales + 1
        return curriculum_num_points(step, self.total_steps, self.s0, self.s1)

    def grid(self, step: int, sigma_min: float, sigma_max: float, device=None) -> torch.Tensor:
        """The discretisation t_0 < ... < t_{N-1} at optimiser ``step``, float64: Karras et al. (2022) Eq. 5 levels
        (`restore.engine.schedules.karras_sigmas`, ascending), t_k = (smin^(1/rho) + k/(N-1) (smax^(1/rho) -
        smin^(1/rho)))^rho, N = `num_points` (docs/methods.md#ict)."""
        n = self.num_points(step)
        return karras_sigmas(n, sigma_min, sigma_max, self.rho, append_zero=False, device=device).flip(0)

    # Names of the two terms in ``terms()`` (and in the training log).
    term_names = ("ct", "bct")

    def adjacent_pair(self, model, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                      **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """The adjacent pair (x_t, x_{t′}) of the CT term; ``t``, ``t_prev`` (B,) in x's dtype, t′ < t.

        Consistency training: x_t = x + t·z and x_{t′} = x + t′·z with the same z, i.e. one Euler step of the PF ODE
        from t to t′ with the "x0 = x" oracle (iCT Eq. 7). Subclasses change only this (:class:`BCDLoss`)."""
        return x + _bshape(t, x) * z, x + _bshape(t_prev, x) * z

    def terms(self, model, x: torch.Tensor, *, step: int, generator: torch.Generator | None = None, **cond):
        """{"ct": (B,)} or {"ct": (B,), "bct": (B,)} (see the class docstring; names from ``term_names``)."""
        batch = x.shape[0]
        grid = self.grid(step, model.sigma_min, model.sigma_max, device=x.device)
        p = lognormal_interval_weights(grid, self.p_mean, self.p_std)
        if self.exclude_last_interval and p.numel() < 2:
            raise ValueError("excluding the last interval needs at least 3 grid points")
        gen_device = generator.device if generator is not None else x.device
        seed = _draw_seed(generator, x.device)

        pair_p = p[:-1] if self.exclude_last_interval else p
        n = torch.multinomial(pair_p.to(gen_device), batch, replacement=True, generator=generator).to(x.device)
        t, t_prev = grid[n + 1], grid[n]
        z = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        t32, t_prev32 = t.to(x.dtype), t_prev.to(x.dtype)
        x_t, x_prev = self.adjacent_pair(model, x, z, t32, t_prev32, **cond)

        out = {}
        with _dropout_sync(model, seed):
            y_star = _target(model, x_prev, t_prev32, **cond).detach()
            online = model(x_t, t32, **cond)
            out[self.term_names[0]] = (1 / (t - t_prev)).to(x.dtype) * pseudo_huber(online, y_star, self.huber_c)
            if self.bidirectional:
                # u = t_m, m ~ p over every interval's left end t_0..t_{N-2}, excluding the index of t itself.
                cols = torch.arange(p.numel(), device=x.device)
                w = torch.where(cols[None, :] == (n + 1)[:, None], 0.0, p[None, :])
                m = torch.multinomial(w.to(gen_device), 1, generator=generator).squeeze(1).to(x.device)
                u = grid[m]
                u32 = u.to(x.dtype)
                x_u = model.jump(x_t, t32, u32, **cond)
                back = _target(model, x_u, u32, **cond)
                out[self.term_names[1]] = (1 / (u - t).abs()).to(x.dtype) * pseudo_huber(back, y_star, self.huber_c)
        return out

    def __call__(self, model, x: torch.Tensor, *, step: int, generator: torch.Generator | None = None, **cond):
        return sum(self.terms(model, x, step=step, generator=generator, **cond).values())


@dataclass(frozen=True)
class ICTLoss(ConsistencyLoss):
    """Improved consistency training (Song & Dhariwal 2023): no bidirectional term, the CT pair may use the last
    interval. Train a ``ConsistencyModel`` with it (the CM baseline)."""

    bidirectional: bool = False
    exclude_last_interval: bool = False


@dataclass(frozen=True)
class BCTLoss(ConsistencyLoss):
    """Bidirectional consistency training (Li & He 2024, docs/methods.md#bct): CT + BCT terms 1:1, last interval
    excluded from the CT pair. ``bidirectional=False`` leaves plain CT (same pair sampling). Train a ``BCM`` with it."""

    bidirectional: bool = True
    exclude_last_interval: bool = True


@contextlib.contextmanager
def _autocast_as(teacher, model) -> Iterator[None]:
    """Run ``teacher`` with the student's autocast setting (``--bf16`` covers both networks); restored after."""
    if not hasattr(teacher, "autocast_dtype"):
        yield
        return
    previous = teacher.autocast_dtype
    teacher.autocast_dtype = getattr(model, "autocast_dtype", None)
    try:
        yield
    finally:
        teacher.autocast_dtype = previous


@dataclass(frozen=True)
class BCDLoss(BCTLoss):
    """Bidirectional consistency distillation (BCD; ours, docs/methods.md#bidirectional-consistency-distillation):
    the BCT loss with the consistency-training pair replaced by one Heun step of a pretrained EDM teacher's PF ODE
    (the bidirectional analogue of consistency distillation, Song et al. 2023 Alg. 2, and of CTM, Kim et al. 2024).

    Everything but the pair is :class:`ConsistencyLoss` with the BCT defaults: grid, curriculum N(k), lognormal
    interval weights, λ = 1/(t − t′) and λ′ = 1/|u − t|, pseudo-Huber d, target θ⁻ = sg(θ), u drawn below or above
    t, the same random draws in the same order (dropout seed, n, z, m). Per sample, with D the teacher:

        x_t    = x + t·z                                             (the data marginal at t, as in BCT)
        d      = (x_t − D(x_t; t))/t,   x̃ = x_t + (t′ − t)·d
        x_{t′} = x_t + (t′ − t)·(d + (x̃ − D(x̃; t′))/t′)/2           (Heun, `restore.engine.sampling.pf_ode_step`)
        y*     = sg[f_{θ⁻}(x_{t′}, t′, σ_min)]
        L      = 1/(t − t′)·d(f_θ(x_t, t, σ_min), y*)                               (denoising direction, "cd")
               + 1/|u − t|·d(f_{θ⁻}(f_θ(x_t, t, u), u, σ_min), y*)               (both directions, u ≷ t, "bcd")

    The teacher call is under ``torch.no_grad()``, in eval mode (no dropout), with the student's autocast dtype
    (``--bf16``); it is moved to the batch's device on first use. Cost: 2 teacher forwards (no backward) per
    training image, on top of BCT's 4 student forwards and backward.

    Deviations (from BCT, and from consistency distillation):
      - the inversion direction (u > t) has no pair of its own: as in BCT, the bidirectional term maps
        f_θ(x_t, t, u) back to σ_min and compares with the same y*, so it inherits the teacher's pair through y*;
      - BCT's curriculum N(k), weights λ and "no t = σ_max in the pair" are kept (CD uses a fixed N = 18, λ = 1 and
        includes σ_max); target EMA 0 (CD: 0.95 or more);
      - x_t is drawn from the data marginal (x + t·z), not from the teacher's ODE trajectory (as in CD);
      - the teacher's label convention is the toolkit's 250·ln σ, like every network here.

    Fields beyond BCT's: ``teacher`` (an ``EDMDenoiser`` or any ``teacher(x, sigma)`` x0-predictor; not part of the
    recipe dict), ``teacher_name`` (bundled name or checkpoint path) and ``teacher_sha256``
    (`restore.engine.checkpoints.weights_sha256`), both recorded in ``to_dict()`` and checked on resume.
    """

    teacher: nn.Module | None = field(default=None, compare=False, repr=False)
    teacher_name: str | None = None
    teacher_sha256: str | None = None

    term_names = ("cd", "bcd")

    def __post_init__(self):
        super().__post_init__()
        if self.teacher is None:
            raise ValueError("BCDLoss needs a teacher (an EDM denoiser)")
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval().requires_grad_(False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "teacher"}

    def adjacent_pair(self, model, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                      **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = x + t·z and x_{t′} = one Heun step of the teacher's PF ODE from (x_t, t) to t′ (class docstring)."""
        x_t = x + _bshape(t, x) * z
        teacher = self.teacher
        if isinstance(teacher, nn.Module):
            ref = next(teacher.parameters(), None)
            if ref is not None and ref.device != x.device:
                teacher.to(x.device)
            if teacher.training:
                teacher.eval()
        with torch.no_grad(), _autocast_as(teacher, model):
            x_prev, _ = pf_ode_step(teacher, x_t, t, t_prev, extra_args=cond)
        return x_t, x_prev.to(x.dtype)


@dataclass(frozen=True)
class EDMLoss:
    """EDM denoising loss (Karras et al. 2022, Eq. 8 with Table 1 "ours"): ln σ ~ N(p_mean, p_std²),
    λ(σ) = (σ² + σ_d²)/(σ·σ_d)², loss = λ(σ)·mean_pixels (D(x + σz, σ) − x)².

    ``model`` is an ``EDMDenoiser``; ``**cond`` (e.g. ``cond=`` degraded image channels for Palette,
    ``class_labels=``) goes to the model unchanged. The per-pixel mean (EDM sums) is a global scale."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def to_dict(self) -> dict:
        return asdict(self)

    def terms(self, model, x: torch.Tensor, *, step: int = 0, generator: torch.Generator | None = None, **cond):
        batch = x.shape[0]
        seed = _draw_seed(generator, x.device)
        sigma = (randn((batch,), generator, device=x.device, dtype=x.dtype) * self.p_std + self.p_mean).exp()
        z = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        sd = model.sigma_data
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        with _dropout_sync(model, seed):
            denoised = model(x + _bshape(sigma, x) * z, sigma, **cond)
        return {"edm": weight * (denoised - x).square().flatten(1).mean(1)}

    def __call__(self, model, x: torch.Tensor, *, step: int = 0, generator: torch.Generator | None = None, **cond):
        return self.terms(model, x, step=step, generator=generator, **cond)["edm"]
