"""Zero-shot diffusion baselines (DPS, PiGDM, DDRM, DDRM-JPEG, DDNM) on oracle priors.

The Gaussian oracle gives the guidance vectors in closed form; the empirical optimal denoiser over CIFAR-10
images is a real, weight-free prior: with the truth in its set the posterior concentrates on it, so every
restorer must beat the degraded input; with held-out images the hard-consistency methods must still
reproduce the measurement.
"""

from __future__ import annotations

import math

import pytest
import torch

import baselines  # noqa: F401 -- registers the methods
from baselines.common import ddim_noise, sampling_levels
from baselines.ddrm import DDRM_JPEG_SIGMA_START, spectral_gain
from baselines.dps import DPS_SCALE, dps_forward, dps_guidance, dps_step, residual_norms
from baselines.pigdm import pigdm_guidance
from benchmarks.metrics import psnr
from operators import build_operator
from restore.engine.oracles import oracle_edm, oracle_edm_empirical
from restore.methods import get_method

GRAD_METHODS = ("dps", "pigdm")
CASES = [  # (method, operator, steps)
    ("dps", "box:size=16", 10), ("dps", "down:factor=2,kernel=avg", 10), ("dps", "jpeg:quality=10", 10),
    ("pigdm", "box:size=16", 6), ("pigdm", "down:factor=2,kernel=avg", 6), ("pigdm", "jpeg:quality=10", 6),
    ("ddrm", "box:size=16", 4), ("ddrm", "down:factor=2,kernel=avg", 4), ("ddrm-jpeg", "jpeg:quality=10", 4),
    ("ddnm", "box:size=16", 4), ("ddnm", "down:factor=2,kernel=avg", 4), ("ddnm", "down:factor=2,kernel=bicubic", 4),
]


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def images(cifar_test) -> torch.Tensor:
    return cifar_test[:16]


@pytest.fixture(scope="module")
def prior_in(images):
    """Empirical prior that contains the 16 test images."""
    return oracle_edm_empirical(images)


@pytest.fixture(scope="module")
def prior_held_out(cifar_test):
    """Empirical prior over 32 other images: restorations differ from the truth."""
    return oracle_edm_empirical(cifar_test[16:48])


def test_registration():
    for name, nfe in (("dps", 1000), ("pigdm", 100), ("ddrm", 20), ("ddrm-jpeg", 20), ("ddnm", 100)):
        m = get_method(name)
        assert (m.model, m.blind, m.default_nfe, m.needs_grad) == ("edm", False, nfe, name in GRAD_METHODS)
    assert get_method("ddrm-jpeg").supports(build_operator("jpeg:quality=10"))
    assert not get_method("ddrm").supports(build_operator("jpeg:quality=10"))
    assert not get_method("ddnm").supports(build_operator("jpeg:quality=10"))


@pytest.mark.parametrize("name,spec,steps", CASES)
def test_restores_better_than_input_with_counted_nfe(name, spec, steps, images, prior_in):
    op = build_operator(spec)
    y = op.measure(images)
    with prior_in.counter.counting() as nfe:
        x_hat = get_method(name)(prior_in, y, op, nfe=steps, generator=_gens(len(images)))
    assert (nfe.forward, nfe.backward) == (steps, steps if name in GRAD_METHODS else 0)
    assert x_hat.shape == images.shape and x_hat.dtype == images.dtype and torch.isfinite(x_hat).all()
    assert psnr(x_hat, images).mean() > psnr(op.pinv(y), images).mean() + 3


@pytest.mark.parametrize("spec", ["randmask:p=0.7", "blur:sigma=3.0,size=61"])
@pytest.mark.parametrize("name,steps", [("dps", 10), ("pigdm", 6), ("ddrm", 4), ("ddnm", 4)])
def test_random_pixel_inpainting_and_deblurring(name, steps, spec, images, prior_in, prior_held_out):
    """The DPS protocol's random-mask and Gaussian-blur operators (drawn per image) with every linear baseline;
    DDRM's equal-gain form takes the mask and refuses the blur (unequal singular values)."""
    op = build_operator(spec).draw(images.shape, _gens(len(images), 50))
    y = op(images)
    if name == "ddrm" and spec.startswith("blur"):
        assert not get_method(name).supports(op)
        with pytest.raises(ValueError, match="equal singular values"):
            spectral_gain(op, y)
        return
    x_hat = get_method(name)(prior_in, y, op, nfe=steps, generator=_gens(len(images)))
    assert torch.isfinite(x_hat).all() and psnr(x_hat, images).mean() > psnr(op.pinv(y), images).mean() + 3
    if name in ("ddrm", "ddnm"):  # hard consistency, also for images the prior does not know
        x_hat = get_method(name)(prior_held_out, y, op, nfe=steps, generator=_gens(len(images)))
        torch.testing.assert_close(op(x_hat), y, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["ddrm", "ddnm"])
@pytest.mark.parametrize("spec", ["box:size=16", "down:factor=2,kernel=avg", "down:factor=4,kernel=avg"])
def test_hard_consistency_on_held_out_images(name, spec, images, prior_held_out):
    op = build_operator(spec)
    y = op(images)
    x_hat = get_method(name)(prior_held_out, y, op, nfe=5, generator=_gens(len(images)))
    assert psnr(x_hat, images).mean() < 40  # the prior does not know these images ...
    torch.testing.assert_close(op(x_hat), y, atol=1e-5, rtol=0)  # ... yet the measurement is reproduced


def test_ddnm_consistency_with_bicubic_down(images, prior_held_out):
    op = build_operator("down:factor=2,kernel=bicubic")
    y = op(images)
    x_hat = get_method("ddnm")(prior_held_out, y, op, nfe=4, generator=_gens(len(images)))
    torch.testing.assert_close(op(x_hat), y, atol=1e-4, rtol=0)


def _explicit_matrix(op, h: int = 8) -> torch.Tensor:
    """The matrix of a linear operator on one-channel h x h images, probed with the standard basis."""
    basis = torch.eye(h * h, dtype=torch.float64).view(h * h, 1, h, h)
    return op(basis).flatten(1).T  # column j = A e_j


@pytest.mark.parametrize("spec,gain", [("box:size=4", 1.0), ("down:factor=2,kernel=avg", 1 / 2),
                                       ("down:factor=4,kernel=avg", 1 / 4)])
def test_spectral_gain_is_the_common_singular_value(spec, gain):
    op = build_operator(spec)
    y = op(torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    assert spectral_gain(op, y) == pytest.approx(gain, rel=1e-9)
    s = torch.linalg.svdvals(_explicit_matrix(op))
    nonzero = s[s > 1e-9]
    torch.testing.assert_close(nonzero, torch.full_like(nonzero, gain))


def test_ddrm_rejects_unequal_singular_values(images, prior_in):
    op = build_operator("down:factor=2,kernel=bicubic")
    s = torch.linalg.svdvals(_explicit_matrix(op))
    assert s.max() - s.min() > 0.1  # bicubic: unequal singular values, no equal-gain form
    with pytest.raises(ValueError, match="equal singular values"):
        get_method("ddrm")(prior_in, op(images), op, nfe=2)


def test_ddrm_with_measurement_noise_denoises_observed_pixels(images, prior_in):
    op = build_operator("box:size=16,noise=0.1")
    y = op.measure(images, generator=_gens(len(images), 100))
    x_hat = get_method("ddrm")(prior_in, y, op, nfe=8, generator=_gens(len(images)))
    m = op.mask_for(images).expand_as(images)
    err_y, err_x = ((y - images)[m]).square().mean(), ((x_hat - images)[m]).square().mean()
    assert err_x < err_y / 4  # sigma_y / s > sigma_s at the last steps: DDRM's noisy branch removes the noise


@pytest.mark.parametrize("spec", ["box:size=8", "down:factor=2,kernel=avg"])
def test_dps_gradient_closed_form_on_gaussian(spec):
    mu, s, sigma = 0.1, 0.5, 1.7
    model = oracle_edm(mu, s).double()
    op = build_operator(spec)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    y = op(torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5)
    x0, grad = dps_guidance(model, x, sigma, y, dps_forward(op))
    k = s**2 / (s**2 + sigma**2)  # dD/dx of the Gaussian denoiser
    r = y - op(mu + k * (x - mu))
    expected = -k * op.adjoint(r) / r.flatten(1).norm(dim=1)[:, None, None, None]
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("spec", ["box:size=16", "down:factor=2,kernel=avg", "jpeg:quality=10"])
def test_dps_gradient_matches_finite_differences(spec, images, prior_in):
    """Through the (non-linear) empirical denoiser and the operator's differentiable forward map."""
    op = build_operator(spec)
    model = prior_in.double()
    x = images[:4].double()
    y = op(x).double()
    sigma = 20.0  # the empirical softmax is not saturated here
    x_t = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    forward = dps_forward(op)
    _, grad = dps_guidance(model, x_t, sigma, y, forward)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-3
    f = lambda z: residual_norms(y, forward(model(z, sigma)))  # noqa: E731
    fd = (f(x_t + h * v) - f(x_t - h * v)) / (2 * h)
    torch.testing.assert_close((grad * v).flatten(1).sum(1), fd, rtol=1e-4, atol=1e-8)
    assert fd.abs().min() > 1e-6


def test_dps_step_is_the_vp_step(images, prior_in):
    """One VE step equals Algorithm 1's VP step (DDPM posterior + zeta grad_{x_VP}) mapped back to VE."""
    op = build_operator("box:size=16")
    model = prior_in.double()
    x = images[:2].double()
    y = op(x)
    sigma, sigma_next, zeta = 3.0, 1.2, 0.5
    x_t = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_next, _ = dps_step(model, x_t, sigma, sigma_next, y, op, zeta, torch.Generator().manual_seed(5))

    a_t, a_s = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)  # abar at both levels
    beta = 1 - a_t / a_s  # the "beta" of one (skipped) DDPM step from t to s
    x_vp = (x_t * math.sqrt(a_t)).requires_grad_(True)
    x0 = model(x_vp / math.sqrt(a_t), sigma)
    (grad_vp,) = torch.autograd.grad(residual_norms(y, op(x0)).sum(), x_vp)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mean = (math.sqrt(a_s) * beta * x0 + math.sqrt(1 - beta) * (1 - a_s) * x_vp) / (1 - a_t)
    x_s_vp = mean.detach() + math.sqrt((1 - a_s) / (1 - a_t) * beta) * z - zeta * grad_vp
    torch.testing.assert_close(x_next, x_s_vp / math.sqrt(a_s))


def test_pigdm_guidance_closed_form_on_gaussian():
    mu, s, sigma = -0.2, 0.5, 0.8
    model = oracle_edm(mu, s).double()
    for spec in ("box:size=4", "down:factor=2,kernel=avg", "jpeg:quality=10"):
        op = build_operator(spec)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        y = op(torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1)
        x0, g = pigdm_guidance(model, x, sigma, y, op)
        k = s**2 / (s**2 + sigma**2)
        torch.testing.assert_close(g, k * (op.pinv(y) - op.pinv(op(x0))))


@pytest.mark.parametrize("name,spec", [(n, s) for n, s, _ in CASES if not s.endswith("bicubic")])
def test_per_image_results_do_not_depend_on_the_batch(name, spec, images, prior_held_out):
    op = build_operator(spec)
    y = op(images[:3])
    batch = get_method(name)(prior_held_out, y, op, nfe=3, generator=_gens(3))
    alone = get_method(name)(prior_held_out, y[1:2], op, nfe=3, generator=_gens(1, 1))
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-5)


def test_schedule_and_noise_helpers():
    model = oracle_edm()
    levels = sampling_levels(model, 5)
    assert len(levels) == 6 and levels[0] == model.sigma_max and levels[-2] == model.sigma_min and levels[-1] == 0
    # DDIM eta = 1 is DDPM's posterior std: sqrt(beta_tilde) / sqrt(abar_s) in VE units
    sigma, sigma_next = 2.0, 0.5
    a_t, a_s = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    beta_tilde = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
    assert ddim_noise(sigma, sigma_next, 1.0) == pytest.approx(math.sqrt(beta_tilde / a_s))
    assert ddim_noise(sigma, sigma_next, 0.0) == 0 and ddim_noise(sigma, 0.0, 1.0) == 0


def test_ddrm_jpeg_start_level_is_t285_of_the_linear_schedule():
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[285]
    assert math.sqrt((1 - abar) / abar) == pytest.approx(DDRM_JPEG_SIGMA_START, abs=1e-3)


def test_dps_default_scales_cover_its_operators():
    assert set(get_method("dps").operators) == set(DPS_SCALE)
