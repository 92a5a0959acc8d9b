"""Property tests over the whole operator registry (docs/design.md#tests-and-oracles).

Every spec in SPECS is checked for shapes / dtype / device, adjointness and pseudo-inverse (linear),
projection (consistent, idempotent, closest point), determinism and batch independence of its
randomness, and spec round trips. Codec-specific JPEG checks live in tests/test_jpeg.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import operators
from operators import (
    Box,
    Downsample,
    GaussianBlur,
    Operator,
    RandBox,
    RandMask,
    build_operator,
    list_operators,
    register_operator,
)
from operators.blur import gaussian_kernel
from operators.utils import make_generators

BASE_SPECS = [
    "jpeg:quality=10",
    "jpeg:quality=50",
    "box:size=16",
    "randbox:size=8",
    "randmask:p=0.7",
    "down:factor=2,kernel=avg",
    "down:factor=4,kernel=bicubic",
    "blur:sigma=3.0,size=61",
    "blur:sigma=1.5,size=9,eps=1e-06",
]
SPECS = BASE_SPECS + [s + ",noise=0.05" for s in BASE_SPECS]
LINEAR_SPECS = [s for s in SPECS if build_operator(s).linear]
NOISY_OR_RANDOM = [s for s in SPECS if "noise" in s or build_operator(s).random]
PINNED_BOXES = [[16, 6], [9, 7], [6, 21], [14, 18]]  # randbox:size=8 on 4 x 32x32 from manual_seed(5)
PINNED_MISSING = [0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1]  # randmask:p=0.5, 1 x 4x4, manual_seed(5)

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")])]


def _ready(spec: str, x: torch.Tensor, seed: int = 0) -> Operator:
    """The operator of ``spec`` drawn for ``x`` (randbox / randmask: with its boxes / masks)."""
    return build_operator(spec).draw(x.shape, torch.Generator().manual_seed(seed), device=x.device)


def _measure(op: Operator, x: torch.Tensor, generator) -> tuple[Operator, torch.Tensor]:
    """Draw the batch's operator and measure with the same generator(s), as every caller does."""
    op = op.draw(x.shape, generator, device=x.device)
    return op, op.measure(x, generator)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4, 6, 4, 1], dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None]) / 256
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(x.shape[1], 1, 5, 5), groups=x.shape[1])


# -- shapes, dtype, device ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", SPECS)
def test_shapes_dtype_device(spec, dtype, device, cifar_test):
    x = cifar_test[:3].to(device, dtype)
    op = _ready(spec, x)
    y = op(x)
    assert y.shape == op.output_shape(x.shape) and y.dtype == dtype and y.device == x.device
    ym = op.measure(x, torch.Generator().manual_seed(1))
    assert ym.shape == y.shape and ym.dtype == dtype and ym.device == x.device
    p = op.project(x, y)
    assert p.shape == x.shape and p.dtype == dtype and p.device == x.device
    if op.linear:
        for z in (op.adjoint(y), op.pinv(y)):
            assert z.shape == x.shape and z.dtype == dtype and z.device == x.device
    else:
        with pytest.raises(TypeError, match="not linear"):
            op.adjoint(y)


def test_output_shape_of_downsampling_and_bad_sizes():
    op = build_operator("down:factor=4,kernel=avg")
    assert op.output_shape((2, 3, 64, 32)) == (2, 3, 16, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        op(torch.zeros(1, 3, 30, 32))


# -- linear algebra -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", LINEAR_SPECS)
def test_adjointness(spec, rng):
    """<A x, v> = <x, A^T v> in float64 for random x and v."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=rng)
    op = _ready(spec, x)
    v = torch.randn(op.output_shape(x.shape), dtype=torch.float64, generator=rng)
    lhs, rhs = (op(x) * v).sum(), (x * op.adjoint(v)).sum()
    assert abs(lhs - rhs) <= 1e-10 * max(abs(lhs), abs(rhs))


@pytest.mark.parametrize("spec", LINEAR_SPECS)
def test_pinv_is_moore_penrose(spec, rng):
    """A A^+ y = y on the range of A, A^+ A A^+ = A^+, and A^+ y is orthogonal to the null space of A."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=rng)
    op = _ready(spec, x)
    y = op(torch.randn(x.shape, dtype=torch.float64, generator=rng))
    xp = op.pinv(y)
    torch.testing.assert_close(op(xp), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(op.pinv(op(xp)), xp, rtol=0, atol=1e-10)
    null = x - op.pinv(op(x))
    torch.testing.assert_close(op(null), torch.zeros_like(y), rtol=0, atol=1e-10)
    assert abs((null * xp).sum()) < 1e-9 * null.norm() * xp.norm()


@pytest.mark.parametrize("spec", ["down:factor=2,kernel=avg", "down:factor=4,kernel=bicubic"])
def test_downsampling_pinv_is_right_inverse_on_any_lr_image(spec, rng):
    op = build_operator(spec)
    y = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=rng)
    torch.testing.assert_close(op(op.pinv(y)), y, rtol=0, atol=1e-10)


def test_avg_downsampling_is_block_mean_with_nearest_adjoint(rng):
    x = torch.randn(2, 3, 32, 32, generator=rng)
    y = torch.randn(2, 3, 8, 8, generator=rng)
    op = build_operator("down:factor=4,kernel=avg")
    torch.testing.assert_close(op(x), F.avg_pool2d(x, 4))
    torch.testing.assert_close(op.pinv(y), F.interpolate(y, scale_factor=4, mode="nearest"))
    torch.testing.assert_close(op.adjoint(y), F.interpolate(y, scale_factor=4, mode="nearest") / 16)


@pytest.mark.parametrize("factor", [2, 4])
def test_bicubic_matches_torch_antialias_away_from_the_border(factor, rng):
    """Independent oracle: torch's antialiased bicubic (Keys a=-0.5, support 4K) agrees exactly
    where no tap reaches the border (torch renormalises truncated taps instead of reflecting)."""
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=rng)
    ours = build_operator(f"down:factor={factor},kernel=bicubic")(x)
    ref = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(ours[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], rtol=0, atol=1e-12)
    const = torch.full_like(x, 0.3)
    torch.testing.assert_close(build_operator(f"down:factor={factor},kernel=bicubic")(const),
                               const[..., ::factor, ::factor])


# -- projection -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", LINEAR_SPECS)
def test_linear_project_is_the_closest_consistent_image(spec, cifar_test, rng):
    truth = cifar_test[:4].double()
    op = _ready(spec, truth)
    y = op.measure(truth, rng)
    x = _blur(truth)
    p = op.project(x, y)
    # consistent: A p = A A^+ y, the part of y in the range (= y unless white noise leaves the range: blur)
    torch.testing.assert_close(op(p), op(op.pinv(y)), rtol=0, atol=1e-10)
    if op.noise == 0 or not isinstance(op, GaussianBlur):
        torch.testing.assert_close(op(p), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(op.project(p, y), p, rtol=0, atol=1e-10)  # idempotent
    # closest: any other consistent image z = p + (null-space vector) is farther from x
    v = torch.randn(truth.shape, dtype=torch.float64, generator=rng)
    z = p + (v - op.pinv(op(v)))
    torch.testing.assert_close(op(z), op(p), rtol=0, atol=1e-10)
    assert ((z - x).flatten(1).norm(dim=1) >= (p - x).flatten(1).norm(dim=1)).all()


@pytest.mark.parametrize("spec", [s for s in SPECS if s.startswith("jpeg")])
def test_jpeg_project_is_consistent_and_idempotent(spec, cifar_test, rng):
    """Tolerances stated: measured on 256 CIFAR-10 test images (q10: 98% of images reproduce y
    exactly through the real codec, the rest > 38 dB); here 32 images."""
    truth = cifar_test[:32]
    op = build_operator(spec)
    y = op.measure(truth, rng)
    x = _blur(truth)
    p = op.project(x, y)
    pp = op.project(p, y)
    assert (pp - p).abs().mean() < 1e-4 and (pp - p).abs().max() < 0.1
    if op.noise == 0:
        mse = (op(p) - y).square().flatten(1).mean(1)
        exact = (mse == 0).float().mean()
        assert exact >= 0.85, f"only {exact:.0%} of images consistent after projection"
        assert (mse > 0).sum() == 0 or (10 * torch.log10(4 / mse[mse > 0])).min() > 30


# -- randomness -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", NOISY_OR_RANDOM)
def test_measure_is_deterministic_given_the_generator(spec, cifar_test):
    x = cifar_test[:4]
    op = build_operator(spec)
    a = _measure(op, x, torch.Generator().manual_seed(3))[1]
    b = _measure(op, x, torch.Generator().manual_seed(3))[1]
    c = _measure(op, x, torch.Generator().manual_seed(4))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("spec", NOISY_OR_RANDOM)
def test_per_image_generators_do_not_depend_on_batch_composition(spec, cifar_test):
    ids = [10, 11, 12, 13, 14]
    x = cifar_test[ids]
    op = build_operator(spec)
    full_op, full = _measure(op, x, make_generators(7, ids))
    sub = [3, 0]
    part_op, part = _measure(op, x[sub], make_generators(7, [ids[i] for i in sub]))
    torch.testing.assert_close(part, full[sub], rtol=0, atol=0)
    if isinstance(op, RandBox):
        assert torch.equal(part_op.boxes, full_op.boxes[sub])
    if op.random:
        assert torch.equal(part_op.mask_for(x[sub]), full_op.mask_for(x)[sub])


def test_measurement_noise_has_the_configured_std(rng):
    x = torch.zeros(8, 3, 32, 32)
    y = build_operator("down:factor=2,kernel=avg,noise=0.05").measure(x, rng)
    assert abs(y.std().item() - 0.05) < 0.002
    assert torch.equal(build_operator("down:factor=2,kernel=avg").measure(x, rng), torch.zeros(8, 3, 16, 16))


# -- masks ----------------------------------------------------------------------------------------
def test_centre_box_is_i2sb_centre_and_hole_is_zero(cifar_test, rng):
    x = cifar_test[:2]
    op = build_operator("box:size=16,noise=0.1")
    y = op.measure(x, rng)
    mask = op.mask_for(x)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 32, 32)
    hole = ~mask[0, 0]
    assert hole[8:24, 8:24].all() and hole.sum() == 256  # rows/cols [H/4, 3H/4)
    assert (y[:, :, 8:24, 8:24] == 0).all() and (y[..., :8, :] != x[..., :8, :]).all()  # noise on observed only
    op = Box(size=4, top=1, left=2)
    assert (~op.mask_for(x)[0, 0]).nonzero().min(0).values.tolist() == [1, 2]
    with pytest.raises(ValueError, match="does not fit"):
        Box(size=8, top=30)(x)


def test_randbox_draws_boxes_inside_the_margin_and_needs_a_draw(cifar_test):
    x = cifar_test[:64]
    family = RandBox(size=8, margin=4)
    for call in (family, family.pinv, lambda x: family.measure(x, None), lambda x: family.project(x, x)):
        with pytest.raises(ValueError, match="no boxes drawn"):
            call(x)
    op = family.draw(x.shape, make_generators(0, range(64)))
    mask = op.mask_for(x)
    assert op.boxes.shape == (64, 2) and mask.shape == (64, 1, 32, 32) and op.image_size == (32, 32)
    assert op.boxes.min() >= 4 and op.boxes.max() <= 32 - 8 - 4
    assert len({tuple(b) for b in op.boxes.tolist()}) > 32  # boxes do move
    assert ((~mask).flatten(1).sum(1) == 64).all()
    assert op.spec == family.spec and op.name == "randbox"  # the drawn operator is still a randbox:size=8,...
    with pytest.raises(ValueError, match="drawn for images"):
        op(x[:3])
    with pytest.raises(ValueError, match="do not fit"):
        family.with_boxes(torch.tensor([[25, 0]]), (32, 32))


def test_randbox_boxes_are_data_drawn_from_the_generator(cifar_test):
    """Same generator seeds -> the same boxes (the pinned draw below is the one every earlier version made:
    cached measurements and trained models rely on it); a slice of boxes rebuilds the operator of those images."""
    x = cifar_test[:4]
    family = build_operator("randbox:size=8")
    boxes = family.draw_boxes(x.shape, make_generators(0, ["a", "b", "c", "d"]))
    assert boxes.dtype == torch.long and boxes.tolist() == family.draw_boxes(
        x.shape, make_generators(0, ["a", "b", "c", "d"])).tolist()
    assert torch.equal(family.draw(x.shape, make_generators(0, ["a", "b", "c", "d"])).boxes, boxes)
    single = family.draw_boxes(x.shape, torch.Generator().manual_seed(5))
    assert single.tolist() == PINNED_BOXES
    one = family.with_boxes(boxes[2:3], x.shape[-2:])
    two = family.draw(x[2:3].shape, make_generators(0, ["c"]))
    assert torch.equal(one(x[2:3]), two(x[2:3]))


def test_randmask_misses_a_fraction_p_of_whole_pixels():
    x = torch.ones(2, 3, 512, 512)
    op = RandMask(p=0.7).draw(x.shape, make_generators(0, ["a", "b"]))
    y = op(x)
    missing = y == 0
    assert torch.equal(missing, missing[:, :1].expand_as(missing))  # all channels together
    assert op.mask.shape == (2, 1, 512, 512) and torch.equal(op.mask_for(x), ~missing[:, :1])
    frac = missing[:, 0].float().mean((1, 2))
    assert (frac - 0.7).abs().max() < 0.005  # binomial std 9e-4
    assert not torch.equal(op.mask[0], op.mask[1])  # one mask per image
    assert torch.equal(RandMask(p=0.0).draw(x.shape, None).mask_for(x).logical_not().sum(), torch.tensor(0))


def test_randmask_masks_are_data_drawn_from_the_generator(cifar_test):
    """Same seeds -> the same masks (pinned draw: cached measurements rely on it); masks need a draw; a slice of
    masks rebuilds the operator of those images."""
    x = cifar_test[:4]
    family = build_operator("randmask:p=0.3")
    for call in (family, family.pinv, lambda x: family.measure(x, None)):
        with pytest.raises(ValueError, match="no masks drawn"):
            call(x)
    a = family.draw(x.shape, make_generators(0, range(4)))
    assert torch.equal(a.mask, family.draw(x.shape, make_generators(0, range(4))).mask)
    assert not torch.equal(a.mask, family.draw(x.shape, make_generators(1, range(4))).mask)
    assert a.spec == family.spec and a.name == "randmask" and family.mask is None
    pinned = RandMask(p=0.5).draw_mask((1, 3, 4, 4), torch.Generator().manual_seed(5))
    assert (~pinned).flatten().int().tolist() == PINNED_MISSING
    torch.testing.assert_close(family.with_mask(a.mask[2:3])(x[2:3]), a(x)[2:3], rtol=0, atol=0)
    with pytest.raises(ValueError, match="drawn for images"):
        a(x[:, :, :16])
    with pytest.raises(ValueError, match="bool tensor"):
        family.with_mask(a.mask.float())


# -- blur -------------------------------------------------------------------------------------------
def test_blur_kernel_is_a_normalised_symmetric_gaussian():
    k = gaussian_kernel(3.0, 61)
    assert k.shape == (61, 61) and k.dtype == torch.float64
    torch.testing.assert_close(k.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(k, k.T) and torch.equal(k, k.flip(0)) and k.argmax() == 30 * 61 + 30
    torch.testing.assert_close(k[30, 31] / k[30, 30], torch.tensor(-1 / 18).exp().double())  # exp(-1 / 2 sigma^2)
    const = torch.full((1, 3, 16, 16), 0.4, dtype=torch.float64)
    torch.testing.assert_close(build_operator("blur:sigma=3.0,size=61")(const), const, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("spec", "n"), [("blur:sigma=3.0,size=61", 64), ("blur:sigma=3.0,size=61", 32),
                                         ("blur:sigma=1.5,size=9", 32), ("blur:sigma=2.0,size=15,eps=1e-09", 32),
                                         ("blur:sigma=4.0,size=41,eps=1e-09", 16)])
def test_blur_is_circular_convolution_up_to_the_spectral_floor(spec, n, rng):
    """Oracle: direct convolution with the kernel under periodic padding (wrapping more than once when the kernel
    is wider than the image); the dropped frequencies (gain <= eps) change A x by at most eps ||x||."""
    op = build_operator(spec)
    x = torch.randn(2, 3, n, n, dtype=torch.float64, generator=rng)
    size, r = op.params["size"], op.params["size"] // 2
    rows = torch.arange(-r, n + r) % n
    padded = x[..., rows[:, None], rows[None, :]]
    if r <= n:
        torch.testing.assert_close(padded, F.pad(x, (r, r, r, r), mode="circular"), rtol=0, atol=0)
    ref = F.conv2d(padded, gaussian_kernel(op.params["sigma"], size).expand(3, 1, size, size), groups=3)
    err = (op(x) - ref).flatten(1).norm(dim=1)
    assert (err <= op.params["eps"] * x.flatten(1).norm(dim=1) + 1e-12).all()


def test_blur_pseudo_inverse_recovers_low_frequencies(rng):
    """A^+ A is the identity on the frequencies the blur keeps (gain > eps), in float64 and float32."""
    op = build_operator("blur:sigma=3.0,size=61")
    n = 64
    i = torch.arange(n, dtype=torch.float64)
    x = sum(torch.randn((), generator=rng, dtype=torch.float64) * torch.cos(2 * torch.pi * (a * i[:, None] + b * i) / n
                                                                             + phase)
            for a, b, phase in [(0, 0, 0.0), (1, 0, 0.3), (0, 2, 1.0), (3, 4, 2.0), (6, -5, 0.5)])
    x = (0.3 * x).expand(2, 3, n, n).contiguous()
    y = op(x)
    assert (y - x).abs().max() > 0.01  # really blurred
    torch.testing.assert_close(op.pinv(y), x, rtol=0, atol=1e-10)
    torch.testing.assert_close(op.pinv(y.float()), x.float(), rtol=0, atol=1e-4)
    assert torch.equal(op.adjoint(y), op(y))  # symmetric kernel, circular boundary: A^T = A


@pytest.mark.parametrize("spec", SPECS)
def test_operators_do_not_change_when_used(spec, cifar_test):
    """An operator is immutable after construction: drawing, measuring, projecting and restoring leave it as built."""
    x = cifar_test[:3]

    def state(op):
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(op).items()}

    def same(a, b):
        return a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)

    family = build_operator(spec)
    before = state(family)
    drawn = family.draw(x.shape, make_generators(1, range(3)))
    drawn_before = state(drawn)
    for seed in (1, 2):
        y = drawn.measure(x, make_generators(seed, range(3)))
        drawn.project(x, y)
        drawn(x[:3])
        if drawn.linear:
            drawn.pinv(y)
            drawn.adjoint(y)
        family.draw(x.shape, make_generators(seed + 10, range(3)))
    assert same(state(family), before) and same(state(drawn), drawn_before)
    if not family.random:
        assert drawn is family  # nothing random to draw


# -- specs, registry, errors --------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trip(spec):
    op = build_operator(spec)
    again = build_operator(op.spec)
    assert again == op and again.spec == op.spec and type(again) is type(op)
    assert build_operator((op.name, op.params)) == op
    assert op.spec == spec  # the specs above are already canonical


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        (" down : kernel=bicubic , factor=4 ", "down:factor=4,kernel=bicubic"),
        ("jpeg:quality=10,noise=0", "jpeg:quality=10"),
        ("box:size=16,noise=5e-2", "box:size=16,noise=0.05"),
        (("randbox", {"size": "8", "margin": 2}), "randbox:size=8,margin=2"),
        ("randmask:p=.7", "randmask:p=0.7"),
        ("blur:size=61,sigma=3,eps=0.001", "blur:sigma=3.0,size=61"),
    ],
)
def test_spec_is_canonicalised(spec, canonical):
    assert build_operator(spec).spec == canonical


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("motion:size=9", ["blur", "box", "down", "jpeg", "randbox", "randmask"]),
        ("jpeg:q=10", ["quality", "noise"]),
        ("jpeg", ["missing", "quality"]),
        ("jpeg:quality=0", ["[1, 100]"]),
        ("jpeg:quality=ten", ["quality"]),
        ("jpeg:quality=10.5", ["quality"]),
        ("down:factor=4,kernel=lanczos", ["avg|bicubic"]),
        ("down:factor=1,kernel=avg", [">= 2"]),
        ("box:size", ["key=value", "size"]),
        ("box:size=4,size=5", ["twice"]),
        ("box:size=4,noise=-0.1", ["noise", ">= 0"]),
        (("box", {"size": 4, "colour": 1}), ["colour", "size", "top", "left"]),
        ("randmask:p=1.5", ["p", "[0, 1]"]),
        ("randmask", ["missing", "p"]),
        ("blur:sigma=3", ["missing", "size"]),
        ("blur:sigma=3,size=60", ["size", "odd"]),
        ("blur:sigma=0,size=9", ["sigma", ">= 0.1"]),
        (42, ["name[:key=value"]),
    ],
)
def test_errors_list_the_valid_choices(spec, expected):
    with pytest.raises(ValueError) as info:
        build_operator(spec)
    for text in expected:
        assert text in str(info.value)


def test_list_operators_describes_the_registry():
    listing = list_operators()
    assert set(listing) == {"blur", "box", "down", "jpeg", "randbox", "randmask"}
    assert {n: d["linear"] for n, d in listing.items()} == {
        "blur": True, "box": True, "down": True, "jpeg": False, "randbox": True, "randmask": True}
    for entry in listing.values():
        assert entry["description"] and "\n" not in entry["description"]
        assert entry["params"]["noise"] == {
            "type": "float", "default": 0.0, "required": False,
            "help": "std of additive Gaussian measurement noise, [-1, 1] units", "range": [0.0, None],
        }
    assert listing["down"]["params"]["kernel"]["choices"] == ["avg", "bicubic"]
    assert listing["jpeg"]["params"]["quality"]["required"]
    assert listing["jpeg"]["params"]["quality"]["range"] == [1, 100]
    assert listing["randbox"]["params"]["margin"]["default"] == 0
    assert listing["randmask"]["params"]["p"]["range"] == [0.0, 1.0]
    assert listing["blur"]["params"]["eps"]["default"] == 1e-3 and listing["blur"]["params"]["size"]["required"]


def test_register_operator_validates(monkeypatch):
    monkeypatch.setattr(operators.registry, "_REGISTRY", dict(operators.registry._REGISTRY))
    for bad in ["Jpeg", "1x", "a-b", "", "with space"]:
        with pytest.raises(ValueError, match="must match"):
            register_operator(bad)
    with pytest.raises(ValueError, match="already registered"):
        register_operator("jpeg")(Downsample)
    with pytest.raises(TypeError, match="Operator subclass"):
        register_operator("plain")(object)

    @register_operator("negate")
    class Negate(Operator):
        """Sign flip (test operator)."""

        linear = True

        def forward(self, x):
            return -x

        adjoint = pinv = forward

    op = build_operator("negate:noise=0.5")
    assert isinstance(op, Negate) and op.spec == "negate:noise=0.5" and "negate" in list_operators()
    x = torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(op.project(torch.zeros_like(x), -x), x)


@pytest.mark.parametrize("spec", BASE_SPECS)
def test_tables_cached_in_inference_mode_still_serve_autograd(spec):
    """A restoration under torch.inference_mode() builds an operator's cached matrices first; a gradient method
    (DPS) in the same process must still differentiate through the operator (operators.utils.tensor_cache)."""
    size = 48  # a size no other test uses, so the cache is filled here, in inference mode
    op = _ready(spec, torch.zeros(2, 3, size, size, dtype=torch.float64))  # drawn masks are the caller's data
    with torch.inference_mode():
        y = op(torch.zeros(2, 3, size, size, dtype=torch.float64))
        op.project(torch.zeros(2, 3, size, size, dtype=torch.float64), y)
    x = torch.rand(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    forward = getattr(op, "differentiable", op)
    (g,) = torch.autograd.grad(forward(x).square().sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all()
