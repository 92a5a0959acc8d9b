"""Weight-free oracle priors for tests (docs/design.md#tests-and-oracles).

- `GaussianFlow`: data N(mu, s^2 I). The optimal denoiser and the PF-ODE flow map are closed-form:
  D(x; sigma) = mu + (x - mu) s^2/(s^2 + sigma^2) and x_u - mu = (x_t - mu) sqrt((s^2+u^2)/(s^2+t^2)).
- `EmpiricalDenoiser`: the optimal denoiser of a finite image set (a real, weight-free prior),
  D(x; sigma) = sum_i softmax_i(-||x - x_i||^2 / (2 sigma^2)) x_i; its flow map integrates the PF ODE.
- `oracle_edm`, `oracle_cm`, `oracle_bcm` (and `*_empirical`): the real wrapper classes of
  `restore.engine.wrappers` around an `OracleNet` that inverts the preconditioning, F = (target - c_skip x)/c_out,
  so the wrapped model is exact. The net decodes t (and u) from the noise labels it receives
  (250 ln sigma), i.e. the oracle goes through exactly the code path of a trained network, NFE counting
  included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from operators.utils import Generator, randn
from restore.engine.sampling import edm_ode_invert, sample_heun
from restore.engine.schedules import karras_sigmas
from restore.engine.wrappers import (
    BCM,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    ConsistencyModel,
    EDMDenoiser,
    append_dims,
    bcm_scalings,
    cm_scalings,
    edm_scalings,
    sigma_from_label,
)


def _level(v, x: torch.Tensor) -> torch.Tensor:
    """A noise level (float, () or (B,) tensor) broadcastable against x."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return append_dims(v, x.ndim) if v.ndim == 1 else v


class GaussianFlow:
    """Closed-form prior for data N(mu, s^2 I): `denoise` (optimal denoiser), `flow` (exact PF-ODE flow map
    of Karras et al. 2022, Eq. 3, from level t to u in either direction) and `sample` (the exact marginal).

    ``mu``: a float or a tensor broadcastable against an image batch (e.g. shape (C, H, W)); ``s`` >= 0.
    """

    def __init__(self, mu: float | torch.Tensor = 0.0, s: float = SIGMA_DATA):
        if s < 0:
            raise ValueError(f"s must be >= 0, got {s}")
        self.mu = mu
        self.s = float(s)

    def _mu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.mu, dtype=x.dtype, device=x.device)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """E[x0 | x_sigma = x] = mu + (x - mu) s^2/(s^2 + sigma^2)."""
        mu, sigma = self._mu(x), _level(sigma, x)
        return mu + (x - mu) * (self.s**2 / (self.s**2 + sigma**2))

    __call__ = denoise

    def flow(self, x: torch.Tensor, t, u) -> torch.Tensor:
        """PF-ODE flow map from level t to u: x_u - mu = (x_t - mu) sqrt((s^2 + u^2)/(s^2 + t^2))."""
        mu, t, u = self._mu(x), _level(t, x), _level(u, x)
        return mu + (x - mu) * torch.sqrt((self.s**2 + u**2) / (self.s**2 + t**2))

    def sample(self, shape: Sequence[int], sigma: float = 0.0, generator: Generator = None, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draw from the marginal at noise level sigma, N(mu, (s^2 + sigma^2) I)."""
        z = randn(shape, generator, device=device, dtype=dtype)
        return self._mu(z) + (self.s**2 + sigma**2) ** 0.5 * z


class EmpiricalDenoiser:
    """Optimal denoiser of the empirical distribution of ``images`` (N, C, H, W):
    D(x; sigma) = sum_i softmax_i(-||x - x_i||^2 / (2 sigma^2)) x_i (Karras et al. 2022, Eq. 57; batched,
    log-sum-exp stable, logits in float64). Differentiable in x. Callable as ``D(x, sigma)``.
    """

    def __init__(self, images: torch.Tensor):
        if images.ndim < 2 or images.shape[0] < 1:
            raise ValueError(f"images must be a non-empty batch, got shape {tuple(images.shape)}")
        self.images = images

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if x.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"image shape {tuple(x.shape[1:])} != training images {tuple(self.images.shape[1:])}")
        ref = self.images.to(device=x.device, dtype=torch.float64).flatten(1)
        xf = x.to(torch.float64).flatten(1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        # -||x - x_i||^2 / 2 up to a per-row constant (-||x||^2 / 2), which softmax ignores
        logits = (xf @ ref.T - 0.5 * ref.square().sum(1)) / sigma**2
        return (torch.softmax(logits, dim=1) @ ref).view_as(x).to(x.dtype)

    __call__ = denoise

    def flow(self, x: torch.Tensor, t: float, u: float, num_steps: int = 32) -> torch.Tensor:
        """PF-ODE flow map from level t to u (either direction), integrated with ``num_steps`` Heun steps on
        a rho = 7 Karras grid between t and u (Karras et al. 2022, Algorithm 1). Scalar t, u only."""
        t, u = float(t), float(u)
        if t == u:
            return x
        grid = karras_sigmas(num_steps + 1, min(t, u), max(t, u), append_zero=False)
        return sample_heun(self, x, grid) if u < t else edm_ode_invert(self, x, grid.flip(0))


class OracleNet(nn.Module):
    """A "network" F for which a wrapper is exact: it decodes t (and u) from the noise labels, recovers
    x_t = x_in / c_in(t) and returns F = (target(x_t, t, u) - c_skip x_t) / c_out (0 where c_out = 0).

    ``scalings(t, u) -> (c_skip, c_out, c_in)``, ``target(x_t, t, u) -> desired wrapper output``;
    u is None for non-bidirectional wrappers.
    """

    def __init__(self, scalings: Callable, target: Callable):
        super().__init__()
        self.scalings = scalings
        self.target = target

    def forward(self, x: torch.Tensor, noise_t: torch.Tensor, noise_u: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = append_dims(sigma_from_label(noise_t.to(x.dtype)), x.ndim)
        u = None if noise_u is None else append_dims(sigma_from_label(noise_u.to(x.dtype)), x.ndim)
        c_skip, c_out, c_in = self.scalings(t, u)
        x_t = x / c_in
        zero = c_out == 0
        residual = self.target(x_t, t, u) - c_skip * x_t
        return torch.where(zero, torch.zeros_like(residual),
                           residual / torch.where(zero, torch.ones_like(c_out), c_out))


def _wrapper_kwargs(sigma_data: float, sigma_min: float, sigma_max: float) -> dict:
    return {"sigma_data": sigma_data, "sigma_min": sigma_min, "sigma_max": sigma_max}


def oracle_edm(mu: float | torch.Tensor = 0.0, s: float = SIGMA_DATA, *, sigma_data: float = SIGMA_DATA,
               sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> EDMDenoiser:
    """`EDMDenoiser` whose output is the exact Gaussian denoiser of N(mu, s^2 I)."""
    prior = GaussianFlow(mu, s)
    net = OracleNet(lambda t, u: edm_scalings(t, sigma_data), lambda x, t, u: prior.denoise(x, t))
    return EDMDenoiser(net, **_wrapper_kwargs(sigma_data, sigma_min, sigma_max))


def oracle_cm(mu: float | torch.Tensor = 0.0, s: float = SIGMA_DATA, *, sigma_data: float = SIGMA_DATA,
              sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> ConsistencyModel:
    """`ConsistencyModel` whose jump to sigma_min is the exact Gaussian PF-ODE flow map."""
    prior = GaussianFlow(mu, s)
    net = OracleNet(lambda t, u: cm_scalings(t, sigma_data, sigma_min), lambda x, t, u: prior.flow(x, t, sigma_min))
    return ConsistencyModel(net, **_wrapper_kwargs(sigma_data, sigma_min, sigma_max))


def oracle_bcm(mu: float | torch.Tensor = 0.0, s: float = SIGMA_DATA, *, sigma_data: float = SIGMA_DATA,
               sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> BCM:
    """`BCM` whose jump f(x, t, u) is the exact Gaussian PF-ODE flow map, up and down."""
    prior = GaussianFlow(mu, s)
    net = OracleNet(lambda t, u: bcm_scalings(t, u, sigma_data), prior.flow)
    return BCM(net, **_wrapper_kwargs(sigma_data, sigma_min, sigma_max))


def oracle_edm_empirical(images: torch.Tensor, *, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                         sigma_max: float = SIGMA_MAX) -> EDMDenoiser:
    """`EDMDenoiser` whose output is the optimal denoiser of the image set (`EmpiricalDenoiser`)."""
    prior = EmpiricalDenoiser(images)
    net = OracleNet(lambda t, u: edm_scalings(t, sigma_data), lambda x, t, u: prior.denoise(x, t.flatten()))
    return EDMDenoiser(net, **_wrapper_kwargs(sigma_data, sigma_min, sigma_max))


def oracle_bcm_empirical(images: torch.Tensor, num_steps: int = 32, *, sigma_data: float = SIGMA_DATA,
                         sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> BCM:
    """`BCM` whose jump integrates the image set's PF ODE (`EmpiricalDenoiser.flow`, ``num_steps`` Heun
    steps per jump). All images of a batch must share t and u (as in every sampler and inversion here)."""
    prior = EmpiricalDenoiser(images)

    def target(x: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        t, u = t.flatten(), u.flatten()
        if bool((t != t[0]).any() or (u != u[0]).any()):
            raise ValueError("oracle_bcm_empirical needs the same (t, u) for every image of a batch")
        return prior.flow(x, t[0].item(), u[0].item(), num_steps)

    net = OracleNet(lambda t, u: bcm_scalings(t, u, sigma_data), target)
    return BCM(net, **_wrapper_kwargs(sigma_data, sigma_min, sigma_max))
