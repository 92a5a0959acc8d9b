"""Model wrappers: a raw network F plus the preconditioning that turns it into a denoiser,
a consistency model or a bidirectional consistency model.

Every wrapper is an ``nn.Module`` holding ``.net``, the constants ``sigma_min``, ``sigma_max`` and
``sigma_data``, and ``.counter`` (`restore.engine.nfe.NFECounter`), incremented on every network call.
The network is any callable ``net(x, noise_t, noise_u=None, class_labels=None, cond=None)`` whose
noise labels are already transformed: by default the wrappers pass ``250 * ln(sigma)`` (the ADM / openai-CM
label ``1000 * 0.25 * ln(sigma)``, docs/methods.md#bcm-parametrisation); a wrapper built with
``noise_label="log4"`` passes NVlabs EDM's ``ln(sigma) / 4`` instead (`NOISE_LABELS`, saved with the checkpoint);
``noise_u`` is passed only by `BCM`. `VPEpsDenoiser` feeds a discrete VP network its (fractional) step index instead.
A wrapper's ``provides`` names the other kinds it can stand in for (`serves`).
Conditioning (``class_labels``, ``cond``) is passed through ``**cond`` of every call; `class_conditioning` is the
one rule for class labels (docs/design.md#class-labels).

Noise levels ``t``, ``u``, ``sigma`` are Python floats or tensors of shape ``()`` or ``(B,)``.
Preconditioning runs in float32 (float64 inputs stay float64, which the oracle tests use); with
``autocast_dtype`` (e.g. ``torch.bfloat16``) only the network runs under autocast, and its output
is cast back before the skip connection.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from operators import build_operator
from restore.engine.nfe import NFECounter
from restore.engine.plugins import load_plugins

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0


_WRAPPERS: dict[str, type[nn.Module]] = {}


def register_wrapper(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Make ``cls`` loadable under ``name``; it is rebuilt as ``cls(net, sigma_min=, sigma_max=, sigma_data=,
    **wrapper_config)``, where ``wrapper_config`` is what ``model.wrapper_config()`` returned at save time
    (only for classes that define it)."""
    if _WRAPPERS.get(name, cls) is not cls:
        raise ValueError(f"wrapper name {name!r} is already registered to {_WRAPPERS[name].__qualname__}")
    _WRAPPERS[name] = cls
    return cls


def get_wrapper(name: str) -> type[nn.Module]:
    """The wrapper class registered as ``name``; unknown names load the plugins first, whose modules register
    their own wrappers (e.g. the conditional baselines)."""
    if name not in _WRAPPERS:
        load_plugins()  # entry points: restore never imports baselines by name
    if name not in _WRAPPERS:
        raise ValueError(f"unknown model wrapper {name!r}; registered: {sorted(_WRAPPERS)}")
    return _WRAPPERS[name]


def wrapper_name(model: nn.Module) -> str:
    for name, cls in _WRAPPERS.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__qualname__} is not a registered wrapper (see register_wrapper); "
                     f"registered: {sorted(_WRAPPERS)}")


def serves(model_or_name, required: str) -> bool:
    """Whether a wrapper (instance, class or registered name) can stand in where a method needs a ``required``-kind
    model: its own ``kind`` or one of the kinds it ``provides`` (a BCM is also a CM; a VP-epsilon denoiser is an
    EDM-convention denoiser). Objects that are not wrappers answer by their ``kind`` attribute."""
    if isinstance(model_or_name, str):
        model_or_name = get_wrapper(model_or_name)
    return required == getattr(model_or_name, "kind", None) or required in getattr(model_or_name, "provides", ())


def check_range(given: tuple[float | None, float | None], ends: tuple[float, float], what: str,
                rtol: float = 1e-6) -> tuple[float, float]:
    """``ends``, the (sigma_min, sigma_max) a wrapper's schedule fixes, after checking that the ``given`` ones (None:
    not given, e.g. from a checkpoint) agree with them."""
    for g, value in zip(given, ends):
        if g is not None and abs(g - value) > rtol * value:
            raise ValueError(f"sigma_min/sigma_max {given[0]}, {given[1]} do not match {what}'s range {ends}")
    return ends


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions so that ``v`` broadcasts against an ``ndim`` tensor."""
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a {v.ndim}-d tensor to {ndim} dimensions")
    return v.reshape(*v.shape, *(1,) * (ndim - v.ndim))


def noise_label(sigma: torch.Tensor) -> torch.Tensor:
    """Network noise label ``c_noise = 250 ln(sigma)`` (ADM/CM time embedding input,
    docs/methods.md#bcm-parametrisation)."""
    return 250.0 * torch.log(sigma)


# The noise label each checkpoint family's network was trained with, by name (docs/models.md#upstream-checkpoints):
# "250log" for this package, BCM/iCT and openai CM; "log4" for NVlabs EDM's EDMPrecond (Karras et al. 2022, Table 1).
NOISE_LABELS = {"250log": noise_label, "log4": lambda sigma: 0.25 * torch.log(sigma)}


def sigma_from_label(label: torch.Tensor) -> torch.Tensor:
    """Inverse of `noise_label`."""
    return torch.exp(label / 250.0)


def edm_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """EDM preconditioning (Karras et al. 2022, Table 1, "Ours"): returns ``(c_skip, c_out, c_in)``.

    c_skip = sd^2/(sigma^2+sd^2), c_out = sigma*sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2).
    """
    sd2 = sigma_data**2
    den = sigma * sigma + sd2
    return sd2 / den, sigma * sigma_data / den.sqrt(), den.rsqrt()


def cm_scalings(t: torch.Tensor, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
    """Consistency-model boundary-condition scalings (Song et al. 2023, Appendix C; iCT):
    ``(c_skip, c_out, c_in)`` with c_skip = sd^2/((t-smin)^2+sd^2), c_out = (t-smin)*sd/sqrt(t^2+sd^2),
    c_in = 1/sqrt(t^2+sd^2), so f(x, sigma_min) = x exactly.
    """
    sd2 = sigma_data**2
    den = t * t + sd2
    return sd2 / ((t - sigma_min) ** 2 + sd2), (t - sigma_min) * sigma_data / den.sqrt(), den.rsqrt()


def bcm_scalings(t: torch.Tensor, u: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """BCM scalings (Li & He 2024, official `get_scalings_for_bcm`; docs/methods.md#bcm-parametrisation):
    ``(c_skip, c_out, c_in)`` with c_skip = (t*u+sd^2)/(t^2+sd^2), c_out = (t-u)*sd/sqrt(t^2+sd^2),
    c_in = 1/sqrt(t^2+sd^2).

    One formula for u < t and u > t; at u = t the numerator and denominator of c_skip are the same
    floating-point expression and c_out = 0, so f(x, t, t) = x exactly.
    """
    sd2 = sigma_data**2
    den = t * t + sd2
    return (t * u + sd2) / den, (t - u) * sigma_data / den.sqrt(), den.rsqrt()


def check_operator(model, op) -> None:
    """ValueError unless ``op`` is the operator a conditional ``model`` (one with an ``operator`` spec: Palette,
    I2SB) was trained for, same name and parameters; models without one restore any operator."""
    trained_for = getattr(model, "operator", None)
    if trained_for is not None and build_operator(trained_for) != op:
        raise ValueError(f"this {model.kind} model was trained for operator {trained_for!r}, "
                         f"not {op.spec!r}; a supervised baseline only restores its own degradation "
                         "(train one per operator)")


def num_classes(model) -> int:
    """Number of classes a model's network is conditioned on (``model.net.config.num_classes``); 0 for an
    unconditional network, a network without a config (the oracles) or no model at all."""
    config = getattr(getattr(model, "net", None), "config", None)
    return int(getattr(config, "num_classes", 0) or 0)


def class_conditioning(model, class_labels, batch: int, device=None) -> dict:
    """The keyword arguments that carry class labels to ``model``'s network, for every model call of a method
    (``model(x, sigma, **cond)``, ``model.jump(x, t, u, **cond)``, ``extra_args=cond``): ``{"class_labels": (B,)
    int64}`` for a class-conditional network, ``{}`` for an unconditional one.

    ``class_labels``: None, one int for the whole batch, or a sequence / tensor of ``batch`` ints in
    [0, num_classes). A conditional model without labels, or labels for an unconditional model, raise
    ValueError: neither is ever run silently as the other.
    """
    classes = num_classes(model)
    if class_labels is None:
        if classes:
            raise ValueError(f"this {getattr(model, 'kind', '')} model is class-conditional ({classes} classes) but "
                             "no class labels were given: pass class_labels (restore run --class-labels FILE|INT; "
                             "the benchmark runner takes them from a dataset with labels)")
        return {}
    if not classes:
        raise ValueError(f"class labels were given but this {getattr(model, 'kind', '')} model is unconditional "
                         "(num_classes = 0): drop the labels or use a class-conditional model")
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device)
    if labels.ndim == 0:
        labels = labels.expand(batch)
    if labels.shape != (batch,):
        raise ValueError(f"class_labels must be one int or {batch} ints (one per image), "
                         f"got shape {tuple(labels.shape)}")
    if bool(((labels < 0) | (labels >= classes)).any()):
        raise ValueError(f"class labels must lie in [0, {classes}) for this model, got {labels.tolist()}")
    return {"class_labels": labels}


class _PreconditionedModel(nn.Module):
    """Shared machinery: constants, noise-level broadcasting, counted and autocast network calls."""

    kind: str = ""  # registry name used by restore.engine.checkpoints
    provides: tuple[str, ...] = ()  # other kinds this wrapper can stand in for (`serves`)
    bidirectional = False

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX, autocast_dtype: torch.dtype | None = None, noise_label: str = "250log"):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if noise_label not in NOISE_LABELS:
            raise ValueError(f"unknown noise_label {noise_label!r}; known: {sorted(NOISE_LABELS)}")
        self.noise_label = noise_label
        self._label = NOISE_LABELS[noise_label]
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.autocast_dtype = autocast_dtype
        self.counter = NFECounter()

    def wrapper_config(self) -> dict:
        """Settings beyond the sigmas that a checkpoint must restore (only the non-default noise label here)."""
        return {} if self.noise_label == "250log" else {"noise_label": self.noise_label}

    def extra_repr(self) -> str:
        return (f"sigma_data={self.sigma_data}, sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, "
                f"autocast_dtype={self.autocast_dtype}, noise_label={self.noise_label!r}")

    @staticmethod
    def _prepare(x: torch.Tensor, *levels) -> tuple[torch.Tensor, ...]:
        """Cast x to >= float32 and each noise level to a (B,) tensor of the same dtype/device."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        out = [x]
        for v in levels:
            if isinstance(v, (int, float)):  # filled on the device: copying a host scalar syncs CUDA every call
                v = torch.full((x.shape[0],), v, dtype=dtype, device=x.device)
            v = torch.as_tensor(v, dtype=dtype, device=x.device)
            if v.ndim == 0:
                v = v.expand(x.shape[0])
            elif v.shape != (x.shape[0],):
                raise ValueError(f"noise level must be a scalar or have shape ({x.shape[0]},), got {tuple(v.shape)}")
            out.append(v)
        return tuple(out)

    def _net_dtype(self) -> torch.dtype | None:
        p = next((p for p in self.net.parameters() if p.is_floating_point()), None)
        return None if p is None else p.dtype

    def _run_net(self, x_in: torch.Tensor, t: torch.Tensor, u: torch.Tensor | None, cond: dict) -> torch.Tensor:
        """F(c_in x, label(t) [, label(u)], **cond), counted; returned in x_in's dtype."""
        kwargs = dict(cond)
        if u is not None:
            kwargs["noise_u"] = self._label(u)
        inp = x_in
        if self.autocast_dtype is None:
            # A network stored in half precision gets its input in its own dtype (autocast does this otherwise).
            net_dtype = self._net_dtype()
            if net_dtype is not None and net_dtype != x_in.dtype:
                inp = x_in.to(net_dtype)
        with torch.autocast(x_in.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            out = self.net(inp, self._label(t), **kwargs)
        return self.counter.record(out).to(x_in.dtype)


class EDMDenoiser(_PreconditionedModel):
    """EDM-preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022,
    Eq. 7 and Table 1), with the ADM-style label c_noise = 250 ln sigma (or EDM's ln(sigma)/4,
    ``noise_label="log4"``). ``model(x, sigma, **cond) -> x0_hat``.
    """

    kind = "edm"

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x, sigma = self._prepare(x, sigma)
        c_skip, c_out, c_in = edm_scalings(append_dims(sigma, x.ndim), self.sigma_data)
        return c_skip * x + c_out * self._run_net(c_in * x, sigma, None, cond)


class ConsistencyModel(_PreconditionedModel):
    """Consistency model f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, 250 ln t) (Song et al. 2023, Eq. 5 and
    Appendix C; iCT). ``model.jump(x, t, u=None)`` only supports u = sigma_min; ``model(x, sigma)`` is that jump.
    """

    kind = "cm"

    def jump(self, x: torch.Tensor, t, u=None, **cond) -> torch.Tensor:
        if u is not None and not torch.allclose(torch.as_tensor(u, dtype=torch.float64).cpu(),
                                                torch.tensor(self.sigma_min, dtype=torch.float64), rtol=1e-6, atol=0):
            raise ValueError(f"a consistency model only maps to u = sigma_min = {self.sigma_min}; "
                             "use a BCM for other target noise levels")
        x, t = self._prepare(x, t)
        c_skip, c_out, c_in = cm_scalings(append_dims(t, x.ndim), self.sigma_data, self.sigma_min)
        return c_skip * x + c_out * self._run_net(c_in * x, t, None, cond)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        return self.jump(x, sigma, **cond)


class BCM(_PreconditionedModel):
    """Bidirectional consistency model f(x_t, t, u) = c_skip(t,u) x_t + c_out(t,u) F(c_in(t) x_t, 250 ln t,
    250 ln u) (Li & He 2024; docs/methods.md#bcm-parametrisation). ``model.jump(x, t, u)`` moves along the PF ODE from
    noise level t to u, down (u < t, generation) or up (u > t, inversion); ``model(x, sigma)`` = jump to sigma_min.
    """

    kind = "bcm"
    provides = ("cm",)  # jump(x, t, sigma_min) is a consistency model
    bidirectional = True

    def jump(self, x: torch.Tensor, t, u, **cond) -> torch.Tensor:
        x, t, u = self._prepare(x, t, u)
        c_skip, c_out, c_in = bcm_scalings(append_dims(t, x.ndim), append_dims(u, x.ndim), self.sigma_data)
        return c_skip * x + c_out * self._run_net(c_in * x, t, u, cond)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        return self.jump(x, sigma, self.sigma_min, **cond)


# Discrete VP schedules of guided-diffusion (`gaussian_diffusion.get_named_beta_schedule`), by name.
VP_SCHEDULES = ("linear", "cosine")


def vp_schedule_sigmas(schedule: str, steps: int = 1000) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..steps-1 (float64) of a discrete VP schedule, abar_t the
    cumulative product of 1 - beta_k, k <= t: "linear" beta_t = linspace(1e-4 s, 0.02 s, steps), s = 1000 / steps
    (Ho et al. 2020); "cosine" beta_t = min(1 - abar(t+1)/abar(t), 0.999), abar(u) = cos^2((u/steps + 0.008)/1.008
    pi/2) (Nichol & Dhariwal 2021). Linear, 1000 steps: sigma in [0.0100, 157.4]; cosine: [0.0064, 20291]."""
    if schedule == "linear":
        scale = 1000.0 / steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    elif schedule == "cosine":
        def abar(u: float) -> float:
            return math.cos((u / steps + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar(i + 1) / abar(i), 0.999) for i in range(steps)], dtype=torch.float64)
    else:
        raise ValueError(f"unknown VP schedule {schedule!r}; known: {', '.join(VP_SCHEDULES)}")
    abar_t = torch.cumprod(1 - betas, 0)
    return ((1 - abar_t) / abar_t).sqrt()


class VPEpsDenoiser(_PreconditionedModel):
    """An epsilon-prediction network of a discrete VP diffusion (guided-diffusion / ADM, DPS's FFHQ model) as an
    EDM-convention denoiser: D(x, sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)) (Karras et al. 2022,
    Table 1, VP / iDDPM columns: c_skip 1, c_out -sigma, c_in 1/sqrt(1 + sigma^2); no sigma_data scaling).

    The network was trained on integer steps t = 0..steps-1 of ``schedule`` (`vp_schedule_sigmas`); t(sigma)
    interpolates the step index linearly in ln sigma between the two neighbouring grid levels (k-diffusion's
    ``sigma_to_t``), exact on the grid and clamped to [0, steps-1] outside the schedule's range. Interpolation rather
    than rounding keeps D continuous in sigma, which the toolkit's samplers (Karras grids, Heun, DPS gradients) assume;
    ADM's sinusoidal embedding accepts fractional steps. ``sigma_min`` / ``sigma_max`` are the schedule's sigma_0 and
    sigma_{steps-1} (given ones must agree). It serves wherever an "edm" denoiser is needed (``provides``).
    """

    kind = "vp-eps"
    provides = ("edm",)

    def __init__(self, net: nn.Module, schedule: str = "linear", steps: int = 1000, sigma_min: float | None = None,
                 sigma_max: float | None = None, sigma_data: float = SIGMA_DATA,
                 autocast_dtype: torch.dtype | None = None):
        sigmas = vp_schedule_sigmas(schedule, int(steps))
        ends = check_range((sigma_min, sigma_max), (float(sigmas[0]), float(sigmas[-1])), f"the {schedule} schedule")
        super().__init__(net, sigma_data=sigma_data, sigma_min=ends[0], sigma_max=ends[1],
                         autocast_dtype=autocast_dtype)
        self.schedule, self.steps = schedule, int(steps)
        self.noise_label = "vp-index"
        self._label = self.timestep
        # A plain float64 tensor, not a buffer: model.half() / .to(dtype) must not coarsen the grid t(sigma) reads.
        self.log_sigmas = sigmas.log()

    def wrapper_config(self) -> dict:
        return {"schedule": self.schedule, "steps": self.steps}

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, steps={self.steps}, {super().extra_repr()}"

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(sigma): the fractional step index, linear in ln sigma between grid levels (float64 internally)."""
        log_sigmas = self.log_sigmas.to(sigma.device)  # copied once per call: 1000 numbers
        ls = torch.log(sigma.to(torch.float64)).clamp(log_sigmas[0], log_sigmas[-1])
        hi = torch.searchsorted(log_sigmas, ls).clamp(1, self.steps - 1)
        w = (ls - log_sigmas[hi - 1]) / (log_sigmas[hi] - log_sigmas[hi - 1])
        return (hi - 1 + w).to(sigma.dtype)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x, sigma = self._prepare(x, sigma)
        s = append_dims(sigma, x.ndim)
        return x - s * self._run_net(x * (1 + s * s).rsqrt(), sigma, None, cond)


for _cls in (EDMDenoiser, ConsistencyModel, BCM, VPEpsDenoiser):
    register_wrapper(_cls.kind, _cls)
