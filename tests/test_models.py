"""Model wrappers, preconditioning, NFE counting and the oracle priors (restore.engine.wrappers / nfe / oracles)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from restore.engine.oracles import (
    EmpiricalDenoiser,
    GaussianFlow,
    oracle_bcm,
    oracle_cm,
    oracle_edm,
    oracle_edm_empirical,
)
from restore.engine.wrappers import (
    BCM,
    ConsistencyModel,
    EDMDenoiser,
    append_dims,
    bcm_scalings,
    cm_scalings,
    edm_scalings,
    noise_label,
    sigma_from_label,
)

SD, SMIN, SMAX = 0.5, 0.002, 80.0
MU, S = 0.3, 0.5
LEVELS = torch.tensor([0.002, 0.01, 0.07, 0.3, 1.0, 2.4, 15.0, 80.0], dtype=torch.float64)


class TinyNet(nn.Module):
    """A small conditional conv net with the UNet's call signature (x, noise_t, noise_u, class_labels, cond)."""

    def __init__(self, bidirectional: bool = False, num_classes: int = 0):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)
        self.emb_t = nn.Linear(1, 8)
        self.emb_u = nn.Linear(1, 8) if bidirectional else None
        self.label_emb = nn.Embedding(num_classes, 8) if num_classes else None
        self.seen_dtypes: list[torch.dtype] = []

    def forward(self, x, noise_t, noise_u=None, class_labels=None, cond=None):
        emb = self.emb_t(noise_t[:, None].to(x.dtype) / 1000)
        if self.emb_u is not None:
            emb = emb + self.emb_u(noise_u[:, None].to(x.dtype) / 1000)
        if self.label_emb is not None:
            emb = emb + self.label_emb(class_labels)
        h = self.conv_in(x)
        self.seen_dtypes.append(h.dtype)
        return self.conv_out(torch.tanh(h + emb[:, :, None, None]))


class ProbeNet(nn.Module):
    """Records what the wrapper passes and returns a fixed function of the input."""

    def forward(self, x, noise_t, noise_u=None, class_labels=None, cond=None):
        self.last = {"x": x, "noise_t": noise_t, "noise_u": noise_u, "class_labels": class_labels}
        return torch.sin(3 * x) + 0.25


def _x(b=4, seed=0, scale=1.0, dtype=torch.float32):
    return scale * torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- preconditioning as pure functions

def test_edm_scalings_minimise_target_variance():
    """EDM Table 1 / App. B.6: unit-variance input, and c_out^2 = (1-c_skip)^2 sd^2 + c_skip^2 sigma^2."""
    c_skip, c_out, c_in = edm_scalings(LEVELS, SD)
    torch.testing.assert_close(c_in**2 * (LEVELS**2 + SD**2), torch.ones_like(LEVELS))
    torch.testing.assert_close(c_out**2, (1 - c_skip) ** 2 * SD**2 + c_skip**2 * LEVELS**2)
    # and c_skip is the minimiser of that target variance: d/dc_skip = 0
    torch.testing.assert_close(-(1 - c_skip) * SD**2 + c_skip * LEVELS**2, torch.zeros_like(LEVELS))


def test_boundary_conditions_are_exact():
    t = LEVELS.float()
    c_skip, c_out, _ = bcm_scalings(t, t, SD)
    assert torch.equal(c_skip, torch.ones_like(t)) and torch.equal(c_out, torch.zeros_like(t))
    c_skip, c_out, _ = cm_scalings(torch.tensor(SMIN), SD, SMIN)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


def test_bcm_scalings_match_cm_at_sigma_min():
    """docs/methods.md#bcm-parametrisation: at u = sigma_min, c_out and c_in equal the CM ones; c_skip differs
    by < 0.002 / t."""
    b_skip, b_out, b_in = bcm_scalings(LEVELS, torch.full_like(LEVELS, SMIN), SD)
    c_skip, c_out, c_in = cm_scalings(LEVELS, SD, SMIN)
    torch.testing.assert_close(b_out, c_out)
    torch.testing.assert_close(b_in, c_in)
    assert ((b_skip - c_skip).abs() * LEVELS).max() < 2.1e-3


def test_noise_label_round_trip():
    torch.testing.assert_close(noise_label(torch.tensor(80.0)), torch.tensor(250 * math.log(80.0)))
    torch.testing.assert_close(sigma_from_label(noise_label(LEVELS)), LEVELS)


def test_append_dims():
    assert append_dims(torch.ones(5), 4).shape == (5, 1, 1, 1)
    assert append_dims(torch.tensor(1.0), 3).shape == (1, 1, 1)
    with pytest.raises(ValueError):
        append_dims(torch.ones(2, 2, 2), 2)


# ---------------------------------------------------------------- wrappers

def _call(model, x, t, u, **cond):
    if isinstance(model, EDMDenoiser):
        return model(x, t, **cond)
    return model.jump(x, t, u, **cond)


@pytest.mark.parametrize("cls", [EDMDenoiser, ConsistencyModel, BCM])
@pytest.mark.parametrize("t", [0.5, torch.tensor(3.0), torch.tensor([0.01, 0.5, 2.0, 80.0])])
def test_wrapper_wiring(cls, t):
    """The wrapper feeds c_in x and 250 ln t (and 250 ln u for BCM only) and returns c_skip x + c_out F."""
    net = ProbeNet()
    model = cls(net)
    x = _x()
    u = SMIN if cls is not BCM else 1.5
    labels = torch.tensor([1, 2, 3, 4])
    out = _call(model, x, t, u, class_labels=labels)
    tb = append_dims(torch.as_tensor(t, dtype=torch.float32).expand(4), 4)
    ub = torch.full_like(tb, u)
    c_skip, c_out, c_in = {EDMDenoiser: lambda: edm_scalings(tb, SD),
                           ConsistencyModel: lambda: cm_scalings(tb, SD, SMIN),
                           BCM: lambda: bcm_scalings(tb, ub, SD)}[cls]()
    torch.testing.assert_close(net.last["x"], c_in * x)
    torch.testing.assert_close(net.last["noise_t"], 250 * torch.log(tb.flatten()))
    assert net.last["class_labels"] is labels
    if cls is BCM:
        torch.testing.assert_close(net.last["noise_u"], 250 * torch.log(ub.flatten()))
    else:
        assert net.last["noise_u"] is None
    torch.testing.assert_close(out, c_skip * x + c_out * (torch.sin(3 * c_in * x) + 0.25))
    assert out.dtype == torch.float32 and model.counter.forward == 1


@pytest.mark.parametrize("t", [0.07, 1.0, 80.0, torch.tensor([0.002, 0.3, 5.0, 80.0])])
def test_bcm_identity_jump_is_exact(t):
    model = BCM(TinyNet(bidirectional=True))
    x = _x(scale=2.0)
    assert torch.equal(model.jump(x, t, t), x)


def test_cm_boundary_and_target_check():
    model = ConsistencyModel(TinyNet())
    x = _x()
    assert torch.equal(model(x, SMIN), x)
    torch.testing.assert_close(model.jump(x, 2.0, SMIN), model(x, 2.0))
    with pytest.raises(ValueError, match="sigma_min"):
        model.jump(x, 2.0, 0.5)
    with pytest.raises(ValueError, match="sigma_min"):
        model.jump(x, 2.0, torch.tensor([SMIN, 0.1, SMIN, SMIN]))


def test_bcm_is_an_euler_step_with_the_edm_denoiser():
    """docs/methods.md#bcm-parametrisation: f(x,t,u) = x + (u - t)(x - D(x;t))/t with D the EDM-preconditioned output of
    the same F."""
    net = TinyNet().double()  # ignores u: the "effective denoiser" is then the EDM denoiser of F
    bcm, edm = BCM(net), EDMDenoiser(net)
    x = _x(scale=3.0, dtype=torch.float64)
    for t, u in [(3.0, 0.002), (3.0, 0.5), (0.07, 80.0), (1.2, 1.3)]:
        torch.testing.assert_close(bcm.jump(x, t, u), x + (u - t) * (x - edm(x, t)) / t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [EDMDenoiser, ConsistencyModel, BCM])
def test_per_sample_levels_match_scalar_calls(cls):
    model = cls(TinyNet(bidirectional=cls is BCM, num_classes=5))
    x = _x()
    t = torch.tensor([0.05, 0.7, 4.0, 80.0])
    u = torch.tensor([1.0, 0.002, 10.0, 0.3]) if cls is BCM else SMIN
    y = torch.tensor([0, 1, 2, 4])
    batched = _call(model, x, t, u, class_labels=y)
    for i in range(4):
        ui = u[i] if cls is BCM else u
        torch.testing.assert_close(_call(model, x[i:i + 1], t[i].item(), ui, class_labels=y[i:i + 1]),
                                   batched[i:i + 1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        _call(model, x, torch.ones(3), u, class_labels=y)


def test_autocast_runs_the_network_in_bf16_only():
    net = TinyNet(bidirectional=True)
    x = _x()
    ref = BCM(net).jump(x, 2.0, 0.3)
    net.seen_dtypes.clear()
    out = BCM(net, autocast_dtype=torch.bfloat16).jump(x, 2.0, 0.3)
    assert net.seen_dtypes == [torch.bfloat16]
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 and not torch.equal(out, ref)


def test_half_precision_network_gets_its_own_dtype():
    net = TinyNet().to(torch.bfloat16)
    out = EDMDenoiser(net)(_x(), 1.0)
    assert net.seen_dtypes == [torch.bfloat16] and out.dtype == torch.float32


def test_float64_inputs_stay_float64():
    model = oracle_bcm(MU, S)
    assert model.jump(_x(dtype=torch.float64), 2.0, 0.1).dtype == torch.float64


def test_invalid_constants():
    with pytest.raises(ValueError):
        BCM(TinyNet(True), sigma_min=1.0, sigma_max=0.5)


# ---------------------------------------------------------------- NFE counting

def test_nfe_counter_forward_backward_and_blocks():
    model = BCM(TinyNet(bidirectional=True))
    counter = model.counter
    x = _x()
    with torch.no_grad():
        model.jump(x, 80.0, 2.4)
    assert (counter.forward, counter.backward) == (1, 0)
    with counter.counting() as outer:
        y = model.jump(x, 80.0, 2.4)
        with counter.counting() as inner:
            z = model.jump(y, 2.4, SMIN)
        z.square().sum().backward()  # flows through both network outputs
    assert (outer.forward, outer.backward) == (2, 2)
    assert (inner.forward, inner.backward) == (1, 1)
    assert (counter.forward, counter.backward) == (3, 2)
    model.jump(x, 1.0, 2.0).sum().backward()  # outside any block: totals only
    assert (outer.forward, inner.forward, counter.forward, counter.backward) == (2, 1, 4, 3)
    counter.reset()
    assert (counter.forward, counter.backward) == (0, 0)


def test_nfe_counter_counts_input_gradients_through_an_oracle():
    """DPS-style: gradient w.r.t. the input of a parameter-free (oracle) network is a counted backward pass."""
    model = oracle_edm(MU, S)
    x = _x().requires_grad_(True)
    with model.counter.counting() as n:
        (model(x, 1.0) - 1).square().sum().backward()
    assert (n.forward, n.backward) == (1, 1)
    assert x.grad is not None
    with torch.inference_mode(), model.counter.counting() as n:
        model(_x(), 1.0)
    assert (n.forward, n.backward) == (1, 0)


# ---------------------------------------------------------------- Gaussian oracle

def test_gaussian_flow_solves_the_pf_ode():
    """The closed-form flow satisfies dx/dsigma = (x - D(x; sigma))/sigma and composes (float64)."""
    g = GaussianFlow(MU, S)
    x = _x(dtype=torch.float64)
    for t in [0.01, 0.5, 3.0, 50.0]:
        h = 1e-5 * t
        dx = (g.flow(x, t, t + h) - g.flow(x, t, t - h)) / (2 * h)
        torch.testing.assert_close(dx, (x - g.denoise(x, t)) / t, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(g.flow(g.flow(x, 0.07, 15.0), 15.0, 80.0), g.flow(x, 0.07, 80.0))
    torch.testing.assert_close(g.flow(g.flow(x, 0.07, 80.0), 80.0, 0.07), x)


PAIRS = [(80.0, SMIN), (80.0, 2.4), (2.4, SMIN), (0.07, 80.0), (0.07, 15.0), (0.1, 1.2), (SMIN, 80.0)]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_oracle_wrappers_are_exact(dtype, rtol):
    g = GaussianFlow(MU, S)
    bcm, cm, edm = oracle_bcm(MU, S), oracle_cm(MU, S), oracle_edm(MU, S)
    for t, u in PAIRS:
        x = g.sample((4, 3, 8, 8), sigma=t, generator=torch.Generator().manual_seed(1), dtype=dtype)
        scale = x.abs().max() * max(1.0, math.sqrt((S**2 + u**2) / (S**2 + t**2)))
        torch.testing.assert_close(bcm.jump(x, t, u), g.flow(x, t, u), rtol=0, atol=rtol * scale)
        torch.testing.assert_close(cm(x, t), g.flow(x, t, SMIN), rtol=0, atol=rtol * x.abs().max())
        torch.testing.assert_close(edm(x, t), g.denoise(x, t), rtol=0, atol=rtol * x.abs().max())
    # per-sample (t, u), up and down in one batch
    x = _x(dtype=dtype)
    t = torch.tensor([80.0, 0.07, 1.0, 0.3], dtype=dtype)
    u = torch.tensor([SMIN, 80.0, 1.0, 2.0], dtype=dtype)
    torch.testing.assert_close(bcm.jump(x, t, u), g.flow(x, append_dims(t, 4), append_dims(u, 4)),
                               rtol=rtol * 100, atol=rtol * 100)
    assert (bcm.counter.forward, cm.counter.forward, edm.counter.forward) == (len(PAIRS) + 1, len(PAIRS), len(PAIRS))


def test_oracle_with_image_shaped_mean():
    mu = torch.linspace(-0.5, 0.5, 3 * 8 * 8).view(3, 8, 8)
    g, bcm = GaussianFlow(mu, 0.2), oracle_bcm(mu, 0.2)
    x = _x(scale=80.0)
    torch.testing.assert_close(bcm(x, 80.0), g.flow(x, 80.0, SMIN), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- empirical oracle

@pytest.fixture
def images():
    return torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_empirical_denoiser_limits(images):
    d = EmpiricalDenoiser(images)
    x = images[[4, 1, 1]] + 0.01 * _x(b=3)
    torch.testing.assert_close(d(x, 1e-3), images[[4, 1, 1]])
    torch.testing.assert_close(d(x, 1e4), images.mean(0, keepdim=True).expand(3, -1, -1, -1))
    torch.testing.assert_close(EmpiricalDenoiser(images[:1])(_x(scale=5.0), 0.7), images[:1].expand(4, -1, -1, -1))


def test_empirical_denoiser_matches_brute_force(images):
    d = EmpiricalDenoiser(images)
    x, sigma = _x(scale=0.8), torch.tensor([0.2, 0.5, 1.0, 3.0])
    dist2 = ((x[:, None] - images[None]) ** 2).flatten(2).sum(2)  # (B, N)
    w = torch.softmax(-dist2 / (2 * sigma[:, None] ** 2), dim=1)
    expected = (w[:, :, None, None, None] * images[None]).sum(1)
    torch.testing.assert_close(d(x, sigma), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(oracle_edm_empirical(images)(x, sigma), expected, rtol=1e-4, atol=1e-5)


def test_empirical_flow_single_image_matches_closed_form(images):
    """One training image is N(x_1, 0): the flow map is x_u - x_1 = (x_t - x_1) u / t."""
    d, g = EmpiricalDenoiser(images[:1].double()), GaussianFlow(images[:1].double(), 0.0)
    x = _x(dtype=torch.float64, scale=2.0)
    for t, u in [(2.0, 0.01), (0.07, 80.0)]:
        torch.testing.assert_close(d.flow(x, t, u, num_steps=16), g.flow(x, t, u), rtol=1e-6, atol=1e-6)


def test_wrappers_are_registered_for_load_model():
    from restore.engine.wrappers import get_wrapper

    assert (get_wrapper("edm"), get_wrapper("cm"), get_wrapper("bcm")) == (EDMDenoiser, ConsistencyModel, BCM)


def test_edm_noise_label_is_saved_and_reaches_the_network(tmp_path):
    """noise_label="log4" (NVlabs EDM's c_noise = ln(sigma)/4) reaches the net and survives save/load."""
    from restore.engine.checkpoints import load_model, save_model
    from restore.engine.networks import UNet, UNetConfig

    seen = []
    net = UNet(UNetConfig.preset("cifar-tiny", img_resolution=8, attention_resolutions=()))
    net.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
    model = EDMDenoiser(net, noise_label="log4")
    model(torch.zeros(2, 3, 8, 8), 2.0)
    torch.testing.assert_close(seen[-1], torch.full((2,), math.log(2.0) / 4))
    loaded = load_model(save_model(model, tmp_path / "edm.safetensors"))
    assert loaded.noise_label == "log4" and loaded.wrapper_config() == {"noise_label": "log4"}
    assert EDMDenoiser(net).wrapper_config() == {}
    with pytest.raises(ValueError, match="unknown noise_label"):
        EDMDenoiser(net, noise_label="vp")
