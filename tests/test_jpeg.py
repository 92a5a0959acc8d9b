"""JPEG operator against the real codec: quantisation tables, differentiable twin, QCS projection.

Run ``pytest tests/test_jpeg.py -s`` to print the measured numbers.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from operators import JPEG, build_operator, quantization_tables
from operators.utils import quantize


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [-1, 1] images, in [0, 1] units; inf when equal."""
    return 10 * torch.log10(4 / (a.double() - b.double()).square().flatten(1).mean(1))


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4, 6, 4, 1])
    k = (k[:, None] * k[None]) / 256
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(x.shape[1], 1, 5, 5), groups=x.shape[1])


@pytest.mark.parametrize("quality", [1, 10, 25, 50, 51, 75, 90, 100])
def test_quantization_tables_match_pillow(quality, cifar_test_uint8):
    buffer = io.BytesIO()
    Image.fromarray(cifar_test_uint8[0]).save(buffer, "JPEG", quality=quality)
    saved = Image.open(buffer)
    luma, chroma = quantization_tables(quality)
    assert list(saved.quantization[0]) == luma.flatten().tolist()
    assert list(saved.quantization[1]) == chroma.flatten().tolist()
    assert [layer[1:3] for layer in saved.layer] == [(2, 2), (1, 1), (1, 1)]  # 4:2:0


def test_forward_is_pillow_on_8bit_input(cifar_test, cifar_test_uint8):
    y = build_operator("jpeg:quality=30")(cifar_test[:4] + 0.001)  # off-grid input is quantised first
    for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray(cifar_test_uint8[i]).save(buffer, "JPEG", quality=30)
        expected = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(y[i], expected, rtol=0, atol=0)


def test_quality_monotonicity(cifar_test):
    x = cifar_test[:64]
    psnrs = [_psnr(build_operator(f"jpeg:quality={q}")(x), x).mean().item() for q in (5, 10, 20, 50, 75, 95)]
    print("PSNR(J_q(x), x) for q = 5, 10, 20, 50, 75, 95:", [f"{p:.2f}" for p in psnrs])
    assert all(a < b for a, b in zip(psnrs, psnrs[1:]))


@pytest.mark.parametrize("quality", [10, 20, 50, 75])
def test_differentiable_agrees_with_the_real_codec(quality, cifar_test):
    """kornia's differentiable JPEG vs libjpeg at the same quality on 64 CIFAR-10 test images
    (measured mean / min: q10 37.7 / 29.8, q20 38.1 / 33.7, q50 40.2 / 35.4, q75 40.5 / 36.1 dB)."""
    x = cifar_test[:64]
    op = build_operator(f"jpeg:quality={quality}")
    psnr = _psnr(op.differentiable(x), op(x))
    print(f"q{quality}: PSNR(differentiable, real) mean {psnr.mean():.2f} min {psnr.min():.2f} dB")
    assert psnr.mean() > 30 and psnr.min() > 25
    # at a different quality the two codecs disagree much more: the floor above is discriminative
    other = build_operator(f"jpeg:quality={quality + 40 if quality < 50 else quality - 40}")
    assert _psnr(other.differentiable(x), op(x)).mean() < psnr.mean() - 2


def test_differentiable_has_gradients(cifar_test):
    x = cifar_test[:2].clone().requires_grad_(True)
    build_operator("jpeg:quality=10").differentiable(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).float().mean() > 0.9


@pytest.mark.parametrize("quality", [10, 50, 90])
def test_decoder_model_reproduces_pillow(quality, cifar_test):
    """decode(recovered indices) vs Pillow's decode: validates tables, colour transform and the
    triangle chroma upsampling (measured mean 53 / 51 / 52 dB; nearest-neighbour chroma gives 41-46 dB)."""
    x = cifar_test[:64]
    op = build_operator(f"jpeg:quality={quality}")
    y = op(x)
    psnr = _psnr(quantize(op.decode(op.quantized_coefficients(y))), y)
    assert psnr.mean() > 49 and psnr.min() > 40


@pytest.mark.parametrize("quality", [10, 50])
def test_recovered_coefficients_match_the_encoder_model(quality, cifar_test):
    """Indices recovered from the decoded measurement vs the float encoder model on the truth;
    the rare mismatches are coefficients within libjpeg's integer rounding of a cell boundary."""
    x = cifar_test[:64]
    op = build_operator(f"jpeg:quality={quality}")
    truth, recovered = op.quantized_coefficients(x, decoded=False), op.quantized_coefficients(op(x))
    for a, b in zip(truth, recovered):
        assert (a == b).double().mean() > 0.99


@pytest.mark.parametrize("quality", [10, 20])
def test_projection_reaches_consistency(quality, cifar_test):
    """Consistency PSNR(J(project(x, y)), y), x = blurred truth, y = J(truth), 128 images.
    Measured (256 images): q10 98.9 dB mean (98.0 % exact) vs 23.9 dB before; q20 98.3 dB (96.9 %)
    vs 24.5 dB; the projection also moves x closer to the truth (25.2 -> 26.5 / 27.8 dB)."""
    truth = cifar_test[:128]
    op = build_operator(f"jpeg:quality={quality}")
    y = op(truth)
    x = _blur(truth)
    p = op.project(x, y)
    before = _psnr(op(x), y).clamp(max=100)
    after = _psnr(op(p), y).clamp(max=100)
    exact = (after == 100).double().mean()
    print(f"q{quality}: cons-PSNR before {before.mean():.2f} dB, after {after.mean():.2f} dB "
          f"({exact:.1%} exact, min {after.min():.2f} dB); PSNR to truth {_psnr(x, truth).mean():.2f} -> "
          f"{_psnr(p, truth).mean():.2f} dB")
    assert before.mean() < 30 and after.mean() > 90 and exact > 0.9 and after.min() > 30
    assert _psnr(p, truth).mean() > _psnr(x, truth).mean()
    # the margin is what makes the result survive 8-bit rounding: the exact cells do much worse
    assert _psnr(op(op.project(x, y, margin=0)), y).clamp(max=100).mean() < after.mean() - 20


def test_projection_keeps_the_truth(cifar_test):
    truth = cifar_test[:16]
    op = build_operator("jpeg:quality=10")
    p = op.project(truth, op(truth), margin=0, iterations=1)
    assert (p - truth).abs().max() < 0.02  # the truth already lies in its own constraint set


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 24, 40)])
def test_grey_and_odd_sizes(shape, cifar_test):
    """Grey images (luma only) and sizes that are not multiples of 16 (edge-padded blocks)."""
    truth = cifar_test[:2, : shape[1], : shape[2], : shape[3]]
    op = JPEG(quality=20)
    y = op(truth)
    assert y.shape == truth.shape
    x = _blur(truth)
    p = op.project(x, y)
    assert _psnr(op(p), y).mean() > _psnr(op(x), y).mean() + 10


def test_rejects_other_channel_counts():
    with pytest.raises(ValueError, match="channels"):
        build_operator("jpeg:quality=10")(torch.zeros(1, 4, 16, 16))
