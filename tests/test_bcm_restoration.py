"""BCM restoration methods (restore.methods.bcm) and the plain baselines (restore.methods.plain), against oracles.

Priors: the exact Gaussian BCM (`oracle_bcm`, closed-form jumps) for the chain structure, and the
empirical BCM over 16 CIFAR-10 test images (`oracle_bcm_empirical`) for restoration of images in the
prior's support (there its optimal denoiser recovers the clean image, so every method must beat the
degraded input by a wide margin).
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

import restore.methods.plain  # noqa: F401  (registers identity / pinv / bicubic)
from benchmarks.metrics import consistency_psnr, psnr
from operators import build_operator
from operators.utils import make_generators
from restore.engine.oracles import GaussianFlow, oracle_bcm, oracle_bcm_empirical
from restore.methods import get_method
from restore.methods.bcm import Round, restoration_rounds, restore_bcm_jpeg, restore_bcm_jpeg_dc  # registers bcm-*

BCM_METHODS = ("bcm-jpeg", "bcm-jpeg-dc", "bcm-inpaint", "bcm-sr")
SPECS = {"bcm-jpeg": "jpeg:quality=10", "bcm-jpeg-dc": "jpeg:quality=10", "bcm-inpaint": "box:size=16",
         "bcm-sr": "down:factor=2,kernel=bicubic"}
SMIN = 0.002


@pytest.fixture(scope="module")
def images(cifar_test):
    return cifar_test[:16]


@pytest.fixture(scope="module")
def empirical(images):
    return oracle_bcm_empirical(images)


def _gens(n, seed=1):
    return make_generators(seed, range(n))


# -- the chain ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 8])
def test_rounds_spend_exactly_nfe(nfe):
    rounds = restoration_rounds(nfe, 0.8, 0.2, noise=0.07)
    assert sum(1 if r.noise is None else 2 for r in rounds) == nfe
    assert (rounds[0].noise is None) == (nfe % 2 == 1)
    assert all(r.noise == 0.07 for r in rounds[nfe % 2:])
    levels = [r.sigma for r in rounds]
    assert levels[0] == pytest.approx(0.8) and levels[-1] == pytest.approx(0.8 if len(levels) == 1 else 0.2)
    ratios = [b / a for a, b in pairwise(levels)]
    assert all(r == pytest.approx(ratios[0]) and r < 1 for r in ratios)  # geometric, decreasing


def test_round_arguments_are_checked():
    assert restoration_rounds(4, 1, 1, sigmas=(3.0, 0.5), first_noise=0.5) == [Round(3.0, 0.5), Round(0.5, 0.07)]
    assert restoration_rounds(3, 1, 1, sigmas=(3.0, 0.5), first_noise=0.5) == [Round(3.0, None), Round(0.5, 0.07)]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
            restoration_rounds(bad, 0.8, 0.2)
    with pytest.raises(ValueError, match="sigmas needs 2 level"):
        restoration_rounds(4, 0.8, 0.2, sigmas=(0.5,))
    with pytest.raises(ValueError, match="must exceed noise"):
        restoration_rounds(2, 0.05, 0.05, noise=0.07)
    with pytest.raises(ValueError, match="noise and first_noise must be > 0"):
        restoration_rounds(2, 0.5, 0.5, noise=0.0)


@pytest.mark.parametrize("nfe", [1, 2, 3, 4])
def test_chain_is_the_exact_flow_on_the_gaussian_oracle(nfe):
    """Each round adds t0 z (t0 = the round's first level) and jumps; with exact jumps the result is the
    closed-form flow from t0 to sigma_min, and the jumps visit the documented levels in order."""
    mu, s = 0.1, 0.5
    g, model = GaussianFlow(mu, s), oracle_bcm(mu, s)
    y = g.sample((3, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    jumps = []
    out = restore_bcm_jpeg(model, y, None, nfe=nfe, generator=_gens(3), sigma_start=0.9, sigma_end=0.3,
                           callback=lambda d: jumps.append((d["i"], d["round"], d["sigma"], d["sigma_next"])))
    rounds = restoration_rounds(nfe, 0.9, 0.3)
    expected_jumps, x, gens = [], y, _gens(3)
    for r, rnd in enumerate(rounds):
        t0 = rnd.sigma if rnd.noise is None else rnd.noise
        x = g.flow(x + t0 * torch.cat([torch.randn((1, 3, 8, 8), generator=gg) for gg in gens]), t0, SMIN)
        levels = (rnd.sigma,) if rnd.noise is None else (rnd.noise, rnd.sigma)
        expected_jumps += [(r, t, u) for t, u in zip(levels, (*levels[1:], SMIN))]
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    assert jumps == [(i, *j) for i, j in enumerate(expected_jumps)]


def _paper_loop(model, x, consistency, nfe, sigma_start, sigma_end, noise, first_noise, gens, sigmas=None):
    """The methods' loop written out literally from the round (Li & He, arXiv 2403.18035: small noise, jump up,
    jump down; then the consistency step), with our odd-budget re-noise round and geometric levels; it uses
    nothing of restore.methods.bcm."""
    def z(x):
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype) for g in gens])

    n = (nfe + 1) // 2
    levels = sigmas or [sigma_start * (sigma_end / sigma_start) ** (k / (n - 1)) if n > 1 else sigma_start
                        for k in range(n)]
    for k, sigma_s in enumerate(levels):
        if k == 0 and nfe % 2 == 1:  # re-noise round: x + sigma_s z, jump down
            x = model.jump(x + sigma_s * z(x), sigma_s, SMIN)
        else:
            t_small = first_noise if k == 0 else noise
            x = x + t_small * z(x)  # small noise
            x = model.jump(x, t_small, sigma_s)  # inversion (up)
            x = model.jump(x, sigma_s, SMIN)  # regeneration (down)
        x = consistency(x)
    return x


PAPER_CASES = [  # (method, operator, hyper-parameters)
    ("bcm-jpeg", "jpeg:quality=10", {}),
    ("bcm-jpeg", "jpeg:quality=10", {"sigma_start": 0.9, "sigma_end": 0.15, "noise": 0.05}),
    ("bcm-jpeg-dc", "jpeg:quality=10", {}),
    ("bcm-jpeg-dc", "jpeg:quality=30", {"sigmas": "1.5/k"}),
    ("bcm-inpaint", "box:size=16", {}),
    ("bcm-inpaint", "randbox:size=12", {"fill": 0.3, "noise": 0.1}),
    ("bcm-inpaint", "box:size=16", {"fill": 0.01, "first_noise": 0.2}),
    ("bcm-sr", "down:factor=2,kernel=bicubic", {}),
    ("bcm-sr", "down:factor=4,kernel=avg", {"sigmas": "1.5/k", "noise": 0.05}),
]


@pytest.mark.parametrize("nfe", [1, 2, 3, 4])
@pytest.mark.parametrize("name, spec, hparams", PAPER_CASES)
def test_methods_are_the_paper_loop_bit_for_bit(name, spec, hparams, nfe):
    """Pinned regression: every method equals (torch.equal) the literal loop above with its start image and
    consistency step, on the Gaussian oracle BCM and seeded random images, at exactly ``nfe`` counted NFE."""
    model = oracle_bcm(torch.rand((3, 32, 32), generator=torch.Generator().manual_seed(1)) - 0.5, 0.4)
    x = torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    gens = _gens(4, seed=7)
    op = build_operator(spec).draw(x.shape, gens)  # randbox draws its boxes here
    y = op.measure(x, gens)
    hp = dict(hparams)
    if hp.get("sigmas") == "1.5/k":
        hp["sigmas"] = [1.5 / k for k in range(1, (nfe + 3) // 2)]
    with model.counter.counting() as count:
        out = get_method(name)(model, y, op, nfe=nfe, generator=_gens(4), **hp)
    assert (count.forward, count.backward) == (nfe, 0)

    defaults = {"bcm-jpeg": (0.5, 0.2), "bcm-jpeg-dc": (0.5, 0.2), "bcm-inpaint": (2.0, 0.3), "bcm-sr": (1.0, 0.2)}
    start, end = hp.get("sigma_start", defaults[name][0]), hp.get("sigma_end", defaults[name][1])
    noise, gens = hp.get("noise", 0.07), _gens(4)
    first_noise, consistency = noise, (lambda v: op.project(v, y))
    if name == "bcm-jpeg":
        x0, consistency = y, (lambda v: v)
    elif name == "bcm-jpeg-dc":
        x0 = y
    elif name == "bcm-inpaint":
        fill = hp.get("fill", model.sigma_data)
        hole = fill * torch.cat([torch.randn((1, *y.shape[1:]), generator=g) for g in gens])
        x0, first_noise = torch.where(op.mask_for(y), y, hole), hp.get("first_noise", max(fill, noise))
    else:
        x0 = op.pinv(y)
    expected = _paper_loop(model, x0, consistency, nfe, start, end, noise, first_noise, gens, hp.get("sigmas"))
    assert torch.equal(out, expected)


# -- NFE, registry, blindness ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BCM_METHODS)
@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_counted_nfe_equals_requested(images, name, nfe):
    model, op = oracle_bcm(0.0, 0.5), build_operator(SPECS[name])
    x = images[:2]
    y = op(x)
    with model.counter.counting() as count:
        out = get_method(name)(model, y, op, nfe=nfe, generator=_gens(2))
    assert (count.forward, count.backward) == (nfe, 0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_registry_entries():
    operators = {"bcm-jpeg": ("jpeg",), "bcm-jpeg-dc": ("jpeg",), "bcm-inpaint": ("box", "randbox"),
                 "bcm-sr": ("down",)}
    for name in BCM_METHODS:
        m = get_method(name)
        assert (m.model, m.blind, m.operators, m.needs_grad) == ("bcm", name == "bcm-jpeg", operators[name], False)
    for name in ("identity", "pinv", "bicubic"):
        assert get_method(name).model == "none" and get_method(name).default_nfe == 0


class _Untouchable:
    """Stands in for the JPEG operator; any use beyond its name fails the test."""

    name = "jpeg"

    def __getattr__(self, attr):
        raise AssertionError(f"the method used op.{attr}")

    def __call__(self, x):
        raise AssertionError("the method evaluated the operator")


def test_blind_jpeg_never_uses_the_operator(images):
    model, y = oracle_bcm(0.0, 0.5), images[:2]
    assert torch.isfinite(get_method("bcm-jpeg")(model, y, _Untouchable(), nfe=4, generator=_gens(2))).all()
    with pytest.raises(AssertionError, match="op.project"):  # the stand-in does catch a non-blind method
        get_method("bcm-jpeg-dc")(model, y, _Untouchable(), nfe=2, generator=_gens(2))


@pytest.mark.parametrize("name, spec", [("bcm-jpeg", "box:size=8"), ("bcm-jpeg-dc", "down:factor=2,kernel=avg"),
                                        ("bcm-inpaint", "jpeg:quality=10"), ("bcm-sr", "box:size=8"),
                                        ("bicubic", "jpeg:quality=10")])
def test_unsupported_operator_is_a_value_error(images, name, spec):
    op = build_operator(spec)
    with pytest.raises(ValueError, match=f"method '{name}' does not support operator '{op.name}'; it supports: "):
        get_method(name)(oracle_bcm(), images[:1], op, nfe=1)


# -- restoration on the empirical prior --------------------------------------------------------------------

@pytest.mark.parametrize("name", BCM_METHODS)
@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_restores_images_in_the_prior_support(images, empirical, name, nfe):
    """Against the best plain baseline (the decoded JPEG, the zero-filled box, the pseudo-inverse).

    Mean and median, not every image: an up-jump from an off-trajectory start amplifies its residual by
    sigma / noise, and the empirical PF ODE (stiff at small sigma) does not integrate back exactly, so with
    2 or 4 NFE a few inpainting / SR images land on another training image (measured: mean gains
    17-47 dB, median gains 27-47 dB, at most 6 of 16 images worse than the baseline).
    """
    op = build_operator(SPECS[name])
    y = op(images)
    baseline = psnr(get_method("pinv")(None, y, op), images)
    restored = psnr(get_method(name)(empirical, y, op, nfe=nfe, generator=_gens(len(images))), images)
    gain = restored - baseline
    assert gain.mean() > 10 and gain.median() > 20


@pytest.mark.parametrize("name, spec", [("bcm-inpaint", "box:size=16"), ("bcm-inpaint", "randbox:size=12"),
                                        ("bcm-sr", "down:factor=2,kernel=bicubic"),
                                        ("bcm-sr", "down:factor=4,kernel=avg")])
def test_linear_non_blind_methods_reproduce_the_measurement(images, empirical, name, spec):
    x = images[:8]
    op = build_operator(spec).draw(x.shape, _gens(8, seed=5))  # randbox draws its boxes here
    y = op.measure(x, _gens(8, seed=5))
    out = get_method(name)(empirical, y, op, nfe=3, generator=_gens(8))
    torch.testing.assert_close(op(out), y, rtol=0, atol=1e-5)


def test_jpeg_projection_makes_the_restoration_consistent(images, empirical):
    op = build_operator("jpeg:quality=10")
    y = op(images)
    blind = restore_bcm_jpeg(empirical, y, op, nfe=2, generator=_gens(16), sigmas=(0.8,))
    dc = restore_bcm_jpeg_dc(empirical, y, op, nfe=2, generator=_gens(16), sigmas=(0.8,))
    c_blind, c_dc = consistency_psnr(blind, y, op), consistency_psnr(dc, y, op)
    assert c_dc.median() == 100 and (c_dc >= 60).all()  # the real codec maps the restoration back to y
    assert c_dc.mean() > c_blind.mean()


@pytest.mark.parametrize("name", BCM_METHODS)
def test_per_image_generators_make_results_independent_of_the_batch(images, empirical, name):
    op = build_operator(SPECS[name])
    x = images[:6]
    y = op(x)
    method = get_method(name)
    whole = method(empirical, y, op, nfe=3, generator=_gens(6))
    gens = _gens(6)
    parts = torch.cat([method(empirical, y[:2], op, nfe=3, generator=gens[:2]),
                       method(empirical, y[2:], op, nfe=3, generator=gens[2:])])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)
    assert not torch.allclose(whole, method(empirical, y, op, nfe=3, generator=_gens(6, seed=2)))


# -- plain baselines ---------------------------------------------------------------------------------------

def test_identity_is_the_degraded_input(images):
    for spec in ("jpeg:quality=10", "box:size=16"):
        op = build_operator(spec)
        y = op(images)
        assert torch.equal(get_method("identity")(None, y, op), y)
    op = build_operator("down:factor=2,kernel=avg")
    y = op(images)
    up = get_method("identity")(None, y, op)
    assert up.shape == images.shape and torch.equal(up[..., ::2, ::2], y) and torch.equal(up[..., 1::2, 1::2], y)
    torch.testing.assert_close(op(up), y)  # for block averaging, nearest upsampling is the pseudo-inverse


@pytest.mark.parametrize("spec", ["box:size=16", "down:factor=2,kernel=bicubic", "down:factor=4,kernel=avg"])
def test_pinv_is_consistent(images, spec):
    op = build_operator(spec)
    y = op(images)
    torch.testing.assert_close(op(get_method("pinv")(None, y, op)), y, rtol=0, atol=1e-5)


def test_bicubic_upsampling(images):
    op = build_operator("down:factor=2,kernel=bicubic")
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(get_method("bicubic")(None, flat, op), torch.full((1, 3, 32, 32), 0.3))
    y = op(images)
    up = get_method("bicubic")(None, y, op)
    assert psnr(up, images).mean() > psnr(get_method("identity")(None, y, op), images).mean() + 1


# -- the consistency-model subset (cm-*) -------------------------------------------------------------------

CM_CASES = [("cm-jpeg", "jpeg:quality=10", (0.5, 0.2)), ("cm-inpaint", "box:size=16", (2.0, 0.3)),
            ("cm-inpaint", "randmask:p=0.7", (2.0, 0.3)), ("cm-sr", "down:factor=2,kernel=bicubic", (1.0, 0.2))]


@pytest.mark.parametrize("nfe", [1, 2, 3])
@pytest.mark.parametrize("name, spec, levels", CM_CASES)
def test_cm_methods_are_multistep_consistency_sampling_from_the_observation(name, spec, levels, nfe):
    """cm-*: ``nfe`` rounds x = C(f(x + sigma_s z, sigma_s, sigma_min)) at geometric levels (Song et al. 2023,
    Algorithms 1 and 4), written out here; a consistency model runs them, and so does a BCM (it stands in for a CM)."""
    from restore.engine.oracles import oracle_cm
    from restore.engine.wrappers import serves

    mu = torch.rand((3, 32, 32), generator=torch.Generator().manual_seed(1)) - 0.5
    x = torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    gens = _gens(4, seed=7)
    op = build_operator(spec).draw(x.shape, gens)
    y = op.measure(x, gens)
    method = get_method(name)
    assert method.model == "cm" and serves("bcm", "cm") and not serves("edm", "cm")
    model = oracle_cm(mu, 0.4)
    with model.counter.counting() as count:
        out = method(model, y, op, nfe=nfe, generator=_gens(4))
    assert (count.forward, count.backward) == (nfe, 0)

    gens = _gens(4)

    def z(v):
        return torch.cat([torch.randn((1, *v.shape[1:]), generator=g) for g in gens])

    consistency = (lambda v: v) if name == "cm-jpeg" else (lambda v: op.project(v, y))
    expected = {"cm-jpeg": y, "cm-sr": op.pinv(y)}.get(name)
    if expected is None:
        expected = torch.where(op.mask_for(y), y, model.sigma_data * z(y))
    for k in range(nfe):
        sigma_s = levels[0] * (levels[1] / levels[0]) ** (k / (nfe - 1)) if nfe > 1 else levels[0]
        expected = consistency(model.jump(expected + sigma_s * z(expected), sigma_s, SMIN))
    assert torch.equal(out, expected)
    # the exact Gaussian BCM jumps to sigma_min along the same flow as the exact CM
    torch.testing.assert_close(method(oracle_bcm(mu, 0.4), y, op, nfe=nfe, generator=_gens(4)), out,
                               rtol=1e-4, atol=1e-4)
