"""BCM inversion, reconstruction, MSE metric and interpolation (restore.engine.bcm_inversion), against oracles."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import GAUSSIAN_MU as MU  # the data of the `g` fixture
from conftest import GAUSSIAN_S as S

from operators.utils import make_generators
from restore.engine.bcm_inversion import bcm_invert, bcm_reconstruct, interpolate, inversion_mse, slerp
from restore.engine.oracles import oracle_bcm, oracle_bcm_empirical

SMIN, SMAX = 0.002, 80.0


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def x0(g):
    return g.sample((4, 3, 8, 8), generator=_gen(1)).clamp(-1, 1)


@pytest.mark.parametrize("sigmas", [(0.07, 80.0), (0.07, 15.0, 80.0)])
def test_invert_equals_the_flow_map_with_the_small_noise_trick(g, x0, sigmas):
    model = oracle_bcm(MU, S)
    z = bcm_invert(model, x0, sigmas, noise=0.07, generator=_gen(2))
    x_tilde = x0 + 0.07 * torch.randn(x0.shape, generator=_gen(2))  # the same draw
    torch.testing.assert_close(z, g.flow(x_tilde, 0.07, SMAX), rtol=1e-5, atol=1e-4)
    assert model.counter.forward == len(sigmas) - 1
    rec = bcm_reconstruct(model, x0, sigmas, generator=_gen(2))
    torch.testing.assert_close(rec, g.flow(x_tilde, 0.07, SMIN), rtol=1e-5, atol=1e-5)
    assert model.counter.forward == 2 * len(sigmas) - 1


@pytest.mark.parametrize("sigmas,sigma_out", [((SMIN, SMAX), None), ((0.07, 80.0), 0.07), ((0.07, 15.0, 80.0), 0.07)])
def test_invert_then_reconstruct_without_noise_is_the_identity(x0, sigmas, sigma_out):
    model = oracle_bcm(MU, S)
    rec = bcm_reconstruct(model, x0, sigmas, noise=0.0, sigma_out=sigma_out)
    assert (rec - x0).abs().max() < 1e-5


def test_inversion_mse_metric():
    x = torch.zeros(3, 3, 4, 4)
    y = x.clone()
    y[1, 0, 0, 0] = 2 / 255  # two 8-bit levels in [-1, 1] units = 1/255 in [0, 1]
    y[2] += 0.3 / 255  # below half a level: quantised away
    mse = inversion_mse(x, y)
    assert mse.shape == (3,)
    torch.testing.assert_close(mse, torch.tensor([0.0, (1 / 255) ** 2 / 48, 0.0]))
    assert inversion_mse(torch.full((1, 3, 2, 2), -1.0), torch.ones(1, 3, 2, 2)).item() == pytest.approx(1.0)


def test_reconstruction_of_real_images_with_the_empirical_bcm(cifar_test):
    """Real data, weight-free prior: images of the set are recovered (paper metric far below BCM's 0.005)."""
    images = cifar_test[:16]
    model = oracle_bcm_empirical(images, num_steps=32)
    rec = bcm_reconstruct(model, images[:4], (0.07, 80.0), generator=make_generators(0, range(4)))
    assert inversion_mse(images[:4], rec).max() < 1e-5


def test_inversion_is_batch_independent_with_per_image_generators(x0):
    model = oracle_bcm(MU, S)
    full = bcm_invert(model, x0, generator=make_generators(0, "abcd"))
    part = bcm_invert(model, x0[2:], generator=make_generators(0, "cd"))
    torch.testing.assert_close(part, full[2:], rtol=0, atol=0)


def test_invert_rejects_bad_levels(x0):
    with pytest.raises(ValueError, match="ascending"):
        bcm_invert(oracle_bcm(), x0, (80.0, 0.07))
    with pytest.raises(ValueError, match="noise"):
        bcm_invert(oracle_bcm(), x0, noise=-1.0)


def test_slerp():
    gen = _gen(4)
    a, b = torch.randn(2, 3, 4, 4, generator=gen), 2 * torch.randn(2, 3, 4, 4, generator=gen)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    na, nb = a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)
    mid = slerp(a, b, 0.25)
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), 0.75 * na + 0.25 * nb)
    # the direction moves along the great circle: angles to a and b are 1/4 and 3/4 of the total
    def cos(p, q):
        return (p.flatten(1) * q.flatten(1)).sum(1) / (p.flatten(1).norm(dim=1) * q.flatten(1).norm(dim=1))

    theta = torch.arccos(cos(a, b))
    torch.testing.assert_close(torch.arccos(cos(a, mid)), 0.25 * theta, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.arccos(cos(mid, b)), 0.75 * theta, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(slerp(a, 3 * a, 0.5), 2 * a)  # parallel: no division by sin(0)


@pytest.mark.parametrize("nfe", [1, 2])
def test_interpolation_end_points_are_the_reconstructions(g, x0, nfe):
    model = oracle_bcm(MU, S)
    x_b = g.sample(x0.shape, generator=_gen(8)).clamp(-1, 1)
    alphas = [0.0, 0.3, 0.7, 1.0]
    out = interpolate(model, x0, x_b, alphas, noise=0.0, nfe=nfe)
    assert out.shape == (4, len(alphas), 3, 8, 8)
    assert model.counter.forward == 2 + nfe * len(alphas)
    torch.testing.assert_close(out[:, 0], g.flow(x0, 0.07, SMIN), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, -1], g.flow(x_b, 0.07, SMIN), rtol=1e-5, atol=1e-5)
    # interpolants are generated from latents at the noise level: their spread stays data-like
    assert out[:, 1:3].std() < 1.5 * S and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="1 or 2"):
        interpolate(model, x0, x_b, alphas, nfe=3)


def test_interpolation_latent_norm_stays_at_the_noise_level(g):
    """Slerp keeps intermediate latents at ~sigma_max sqrt(D); a linear mix would shrink them by ~1/sqrt(2)."""
    a, b = (g.sample((1, 3, 16, 16), sigma=SMAX, generator=_gen(i)) for i in (1, 2))
    expected = SMAX * math.sqrt(a.numel())
    assert abs(slerp(a, b, 0.5).norm().item() / expected - 1) < 0.05
    assert (0.5 * (a + b)).norm().item() / expected < 0.8
