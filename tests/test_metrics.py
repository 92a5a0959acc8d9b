"""Per-image metrics: PSNR / SSIM on 8-bit-quantised images, consistency PSNR, the metric table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.metrics import METRICS, PSNR_CAP, consistency_psnr, get_metric, psnr, ssim
from operators.utils import from_uint8, quantize, to_uint8

STEP = 2 / 255  # one 8-bit code value in [-1, 1] units


class MaskOp:
    """Stand-in inpainting operator: keeps observed pixels, fills the hole with white (I2SB's convention)."""

    linear = True

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def mask_for(self, x):
        return self.mask

    def __call__(self, x):
        return torch.where(self.mask.bool(), x, torch.ones_like(x))


class PoolOp:
    """Stand-in 2x average-pool downsampling operator (measurement in LR space)."""

    linear = True

    def __call__(self, x):
        return F.avg_pool2d(x, 2)


def _mid_images(rng, shape=(4, 3, 32, 32)):
    """Quantised images away from the range ends, so +-a few code values never clamp."""
    return from_uint8(torch.randint(40, 216, shape, generator=rng, dtype=torch.uint8))


def _oracle_psnr(a, b):
    """Per-image PSNR written out independently: uint8 values, MSE in [0, 255]^2, MAX = 255."""
    mse = (to_uint8(a).double() - to_uint8(b).double()).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def test_psnr_uniform_one_code_value_is_48_13_db(rng):
    x = _mid_images(rng)
    out = psnr(x + STEP, x)
    assert out.shape == (4,)
    torch.testing.assert_close(out, torch.full((4,), 20 * math.log10(255), dtype=torch.float64))
    assert 20 * math.log10(255) == pytest.approx(48.1308, abs=1e-4)


def test_psnr_per_image_matches_oracle_and_batch_slices(cifar_test, rng):
    x = cifar_test[:6]
    noise = torch.randn(x.shape, generator=rng) * torch.tensor([0.01, 0.03, 0.1, 0.2, 0.4, 0.8]).view(-1, 1, 1, 1)
    x_hat = x + noise
    out = psnr(x_hat, x)
    torch.testing.assert_close(out, _oracle_psnr(x_hat, x))
    assert torch.all(out[:-1] > out[1:])  # more noise, lower PSNR: one value per image, in order
    torch.testing.assert_close(torch.cat([psnr(x_hat[i : i + 1], x[i : i + 1]) for i in range(6)]), out)


def test_psnr_is_computed_on_quantised_images(rng):
    x = _mid_images(rng)
    below_half_step = x + 0.4 * STEP * (2 * torch.rand(x.shape, generator=rng) - 1)
    assert torch.equal(psnr(below_half_step, x), torch.full((4,), PSNR_CAP, dtype=torch.float64))
    assert torch.all(torch.isinf(psnr(x, x, cap=None)))
    # Values outside [-1, 1] are clamped as a PNG would store them.
    torch.testing.assert_close(psnr(x.clamp(min=0) * 3, x), psnr(quantize(x.clamp(min=0) * 3), x))


def test_psnr_rejects_shape_mismatch(rng):
    x = _mid_images(rng)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:2])


@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_ssim_matches_piq_on_quantised_images(cifar_test, rng, size):
    import piq
    x = F.interpolate(cifar_test[:5], size=size, mode="bilinear", align_corners=False).clamp(-1, 1)
    x_hat = x + 0.15 * torch.randn(x.shape, generator=rng)
    out = ssim(x_hat, x)
    assert out.shape == (5,)
    unit = lambda t: to_uint8(t).double() / 255  # noqa: E731
    ref = piq.ssim(unit(x_hat), unit(x), data_range=1.0, reduction="none", downsample=False,
                   kernel_size=11, kernel_sigma=1.5, k1=0.01, k2=0.03)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert torch.all(out < 0.99)
    torch.testing.assert_close(ssim(x, x), torch.ones(5, dtype=torch.float64))


def test_ssim_rejects_images_smaller_than_window(rng):
    x = _mid_images(rng, (1, 3, 8, 8))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x, x)


def test_consistency_psnr_mask_ignores_unobserved_pixels(rng):
    x = _mid_images(rng)
    mask = torch.zeros(4, 1, 32, 32, dtype=torch.bool)
    for i, side in enumerate((4, 8, 16, 24)):  # a different hole size per image
        mask[i, :, : 32 - side] = True
    op = MaskOp(mask)
    y = op(x)
    hole_garbage = torch.where(mask, x, -x)
    assert torch.equal(consistency_psnr(hole_garbage, y, op), torch.full((4,), PSNR_CAP, dtype=torch.float64))
    # One code value off on the observed pixels: exactly 48.13 dB whatever the hole size; averaging
    # over all pixels would add zeros and inflate PSNR by 10 log10(H W / |observed|).
    out = consistency_psnr(hole_garbage + STEP, y, op)
    assert out.shape == (4,)
    torch.testing.assert_close(out, torch.full((4,), 20 * math.log10(255), dtype=torch.float64))


def test_consistency_psnr_mask_matches_direct_computation(cifar_test, rng):
    x = cifar_test[:3]
    mask = torch.rand(1, 1, 32, 32, generator=rng) > 0.3  # one mask broadcast over the batch
    op = MaskOp(mask)
    x_hat = x + 0.1 * torch.randn(x.shape, generator=rng)
    err = ((to_uint8(x_hat).double() - to_uint8(x).double()) / 255).square()
    m = mask.expand_as(err)
    expected = torch.stack([-10 * torch.log10(err[i][m[i]].mean()) for i in range(3)])
    torch.testing.assert_close(consistency_psnr(x_hat, op(x), op), expected)


def test_consistency_psnr_empty_mask_is_nan(rng):
    x = _mid_images(rng, (2, 3, 16, 16))
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    mask[1] = False
    out = consistency_psnr(x + STEP, MaskOp(mask)(x), MaskOp(mask))
    assert out[0].item() == pytest.approx(20 * math.log10(255), rel=1e-6) and math.isnan(out[1].item())


def test_consistency_psnr_downsampling_compares_in_lr_space(rng):
    x = _mid_images(rng)
    op = PoolOp()
    y = op(x)
    assert y.shape == (4, 3, 16, 16)
    # A +-1 code-value checkerboard averages out in every 2x2 block: consistent, though PSNR(x_hat, x) is 48 dB.
    checker = ((torch.arange(32).view(-1, 1) + torch.arange(32)) % 2 * 2 - 1) * STEP
    x_hat = x + checker
    assert torch.equal(consistency_psnr(x_hat, y, op), torch.full((4,), PSNR_CAP, dtype=torch.float64))
    torch.testing.assert_close(psnr(x_hat, x), torch.full((4,), 20 * math.log10(255), dtype=torch.float64))
    # A uniform shift survives pooling.
    torch.testing.assert_close(consistency_psnr(x + 2 * STEP, y, op),
                               torch.full((4,), 20 * math.log10(255 / 2), dtype=torch.float64))


def test_consistency_psnr_rejects_bad_mask_and_shape(rng):
    x = _mid_images(rng, (2, 3, 16, 16))
    with pytest.raises(TypeError, match="bool"):
        consistency_psnr(x, x, MaskOp(torch.ones(2, 1, 16, 16)))
    with pytest.raises(ValueError, match="shape"):
        consistency_psnr(x, x, PoolOp())


def test_metric_table():
    assert set(METRICS) == {"psnr", "ssim", "cpsnr", "fid", "kid"}
    assert {n: m.higher_is_better for n, m in METRICS.items()} == {
        "psnr": True, "ssim": True, "cpsnr": True, "fid": False, "kid": False
    }
    assert {n for n, m in METRICS.items() if m.per_image} == {"psnr", "ssim", "cpsnr"}
    with pytest.raises(ValueError, match="psnr, ssim, cpsnr, fid, kid"):
        get_metric("lpips")


def test_metric_call_picks_its_inputs(rng):
    x = _mid_images(rng)
    op = PoolOp()
    available = dict(x_hat=x + STEP, x=x, y=op(x), op=op)
    torch.testing.assert_close(get_metric("psnr")(**available), psnr(x + STEP, x))
    torch.testing.assert_close(get_metric("cpsnr")(**available), consistency_psnr(x + STEP, op(x), op))
    with pytest.raises(ValueError, match="needs"):
        get_metric("cpsnr")(x_hat=x, x=x)
