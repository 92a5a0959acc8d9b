"""Training losses (training/losses.py) and BCF initialisation (training/finetune.py).

Oracles: closed-form grid / curriculum / pseudo-Huber formulas, the normal CDF for the interval weights,
a frozen-copy target (requires_grad False) for the stop-gradient semantics, recorded (t, u) pairs and
dropout masks, and the exact CM -> BCM boundary-scaling mismatch for fine-tuning.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import training.losses as L
from restore.engine.networks.layers import SyncDropout
from restore.engine.networks.unet import UNet, UNetConfig
from restore.engine.oracles import oracle_bcm, oracle_cm
from restore.engine.wrappers import BCM, ConsistencyModel, EDMDenoiser, bcm_scalings, cm_scalings
from training.finetune import bcm_from_cm

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_unet(bidirectional: bool, dropout: float = 0.0, res: int = 8, cond_channels: int = 0) -> UNet:
    """cifar-tiny at 8x8 with random (not zero) output layer, so the network output really depends on t and u."""
    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("cifar-tiny", img_resolution=res, attention_resolutions=(), dropout=dropout,
                                 bidirectional=bidirectional, cond_channels=cond_channels))
    with torch.no_grad():
        for p in net.out.parameters():
            p.normal_(0, 0.05)
    return net


class ZeroNet(nn.Module):
    """F = 0: a free stand-in network for tests that only look at the sampled noise levels."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x, noise_t, noise_u=None, **cond):
        return x * self.weight


class Recorder(nn.Module):
    """Wraps a model wrapper and records the noise levels of every call (forward = jump to sigma_min)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.net = model.net
        self.sigma_min, self.sigma_max, self.sigma_data = model.sigma_min, model.sigma_max, model.sigma_data
        self.calls = []

    def forward(self, x, sigma, **cond):
        self.calls.append(("forward", sigma.detach().clone(), None, cond))
        return self.model(x, sigma, **cond)

    def jump(self, x, t, u, **cond):
        self.calls.append(("jump", t.detach().clone(), u.detach().clone(), cond))
        return self.model.jump(x, t, u, **cond)


def _grid(num_points: int) -> torch.Tensor:
    """The grid the consistency losses train on, with N = num_points."""
    return L.BCTLoss(fixed_scales=num_points - 1).grid(0, SIGMA_MIN, SIGMA_MAX)


def test_karras_grid_matches_formula():
    grid = _grid(11)
    assert grid[0].item() == pytest.approx(SIGMA_MIN, rel=1e-12)
    assert grid[-1].item() == pytest.approx(SIGMA_MAX, rel=1e-12)
    assert torch.all(grid[1:] > grid[:-1])
    # rho-th roots are equally spaced.
    assert torch.allclose(grid.pow(1 / 7).diff(), grid.pow(1 / 7).diff()[0].expand(10), rtol=1e-10)
    assert torch.equal(L.ICTLoss(total_steps=800_000).grid(699_999, SIGMA_MIN, SIGMA_MAX), _grid(641))  # curriculum N


@pytest.mark.parametrize("num_points", [3, 11, 21, 41, 81, 161, 321, 641, 1281])
def test_training_grid_is_the_former_ict_grid(num_points):
    """The losses use the one Karras grid (restore.engine.schedules.karras_sigmas, ascending); it reproduces the
    grid they used to compute themselves, t_k = (smin^(1/7) + k/(N-1) (smax^(1/7) - smin^(1/7)))^7, for every N
    of the curriculum (s0 = 10 .. s1 = 1280) and BCF's 321: below 1e-13 in float64 (asserted < 1e-6) and
    identical in the float32 levels the networks see."""
    k = torch.arange(num_points, dtype=torch.float64) / (num_points - 1)
    lo, hi = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
    former = (lo + k * (hi - lo)) ** 7
    grid = _grid(num_points)
    assert grid.dtype == torch.float64 and (grid - former).abs().max().item() < 1e-6
    assert torch.equal(grid.float(), former.float())


@pytest.mark.parametrize("num_points", [11, 21, 321, 1281])
def test_lognormal_weights_are_normal_interval_masses(num_points):
    grid = _grid(num_points)
    p = L.lognormal_interval_weights(grid, -1.1, 2.0)
    assert p.shape == (num_points - 1,)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.all(p > 0)
    cdf = torch.distributions.Normal(torch.tensor(-1.1, dtype=torch.float64), 2.0).cdf(grid.log())
    ref = cdf.diff() / (cdf[-1] - cdf[0])
    assert torch.allclose(p, ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("step, expected", [(0, 11), (99_999, 11), (100_000, 21), (250_000, 41),
                                            (699_999, 641), (700_000, 1281), (10_000_000, 1281)])
def test_curriculum_doubles_every_k_prime(step, expected):
    # K = 800k, s0 = 10, s1 = 1280: K' = 800k / 8 = 100k (docs/methods.md#ict).
    assert L.curriculum_num_points(step, 800_000) == expected


def test_pseudo_huber_limits():
    a = torch.zeros(3, 3, 4, 4)
    dim = 48
    c = 0.00054 * math.sqrt(dim)
    assert torch.all(L.pseudo_huber(a, a) == 0)
    small = a + 1e-4
    quad = (1e-8 * dim) / (2 * c) / math.sqrt(dim)  # ~ ||d||^2 / (2c) for ||d|| << c
    assert L.pseudo_huber(small, a) == pytest.approx(torch.full((3,), quad), rel=1e-2)
    big = a + 1.0
    assert L.pseudo_huber(big, a) == pytest.approx(torch.full((3,), (math.sqrt(dim) - c) / math.sqrt(dim)), rel=1e-4)


def _draws(loss, model, x, step=0, seed=0):
    rec = Recorder(model)
    terms = loss.terms(rec, x, step=step, generator=torch.Generator().manual_seed(seed))
    return rec, terms


def test_pair_and_u_sampling():
    """CT pair: adjacent grid points, never the last interval for BCT; u on the grid, never t, below and above."""
    x = torch.zeros(20_000, 1, 2, 2)
    loss = L.BCTLoss(total_steps=800_000)
    grid = _grid(11).float()
    with torch.no_grad():
        rec, _ = _draws(loss, BCM(ZeroNet()), x)
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["forward", "forward", "jump", "forward"]
    t_prev, t, (_, t_jump, u, _) = rec.calls[0][1], rec.calls[1][1], rec.calls[2]
    n = torch.searchsorted(grid, t_prev)
    assert torch.equal(grid[n], t_prev) and torch.equal(grid[n + 1], t)  # adjacent grid points
    assert t.max() < SIGMA_MAX and n.max() == 8  # last interval (index 9) never used, all others are
    assert torch.equal(t_jump, t)
    m = torch.searchsorted(grid, u)
    assert torch.equal(grid[m], u) and m.max() <= 9  # u in t_0..t_{N-2}
    assert torch.all(u != t)
    assert (u < t).any() and (u > t).any()
    assert torch.equal(rec.calls[3][1], u)  # the target maps x_u from u

    # Frequencies follow the lognormal interval weights (4-sigma binomial bounds).
    p = L.lognormal_interval_weights(_grid(11))
    p_pair = (p[:-1] / p[:-1].sum()).float()
    freq = torch.bincount(n, minlength=9).float() / len(n)
    assert torch.all((freq - p_pair).abs() <= 4 * (p_pair * (1 - p_pair) / len(n)).sqrt() + 1e-3)
    # Given n, u = t_m with m ~ p restricted to m != n + 1.
    sel = n == 3
    q = p.clone().float()
    q[4] = 0
    q /= q.sum()
    freq_u = torch.bincount(m[sel], minlength=10).float() / sel.sum()
    assert freq_u[4] == 0
    assert torch.all((freq_u - q).abs() <= 4 * (q * (1 - q) / sel.sum()).sqrt() + 1e-3)


def test_ict_keeps_last_interval():
    x = torch.zeros(20_000, 1, 2, 2)
    with torch.no_grad():
        rec, terms = _draws(L.ICTLoss(), ConsistencyModel(ZeroNet()), x)
    assert set(terms) == {"ct"} and [c[0] for c in rec.calls] == ["forward", "forward"]
    assert (rec.calls[1][1] == torch.tensor(SIGMA_MAX)).any()


def test_bct_without_bidirectional_term_is_ct():
    model = BCM(tiny_unet(True, dropout=0.2))
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    full = L.BCTLoss().terms(model, x, step=0, generator=torch.Generator().manual_seed(3))
    ct = L.BCTLoss(bidirectional=False).terms(model, x, step=0, generator=torch.Generator().manual_seed(3))
    assert set(full) == {"ct", "bct"} and set(ct) == {"ct"}
    assert torch.equal(full["ct"], ct["ct"])
    assert torch.all(full["bct"] > 0)
    total = L.BCTLoss()(model, x, step=0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(total, full["ct"] + full["bct"])


@pytest.mark.parametrize("loss, oracle", [(L.BCTLoss(fixed_scales=160), oracle_bcm),
                                          (L.BCTLoss(fixed_scales=1280), oracle_bcm),
                                          (L.ICTLoss(fixed_scales=160), oracle_cm)])
def test_exact_flow_map_is_the_fixed_point(monkeypatch, loss, oracle):
    """Gaussian data N(mu, s^2): with the stop-gradient target at the exact flow map, the exact flow maps of
    N(mu, a^2) as online model minimise every loss term at a = s (consistency training's fixed point)."""
    mu, s = -0.4, 0.25
    x = mu + s * torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    target = oracle(mu, s)
    monkeypatch.setattr(L, "_target", lambda m, xx, t, **cond: target(xx, t, **cond))
    candidates = [0.2, 0.23, 0.25, 0.27, 0.3]
    values = [loss.terms(oracle(mu, a), x, step=0, generator=torch.Generator().manual_seed(1)) for a in candidates]
    for name in values[0]:
        means = [v[name].mean().item() for v in values]
        assert min(range(len(means)), key=means.__getitem__) == 2, (name, means)


def test_dropout_without_sync_is_refused():
    net = nn.Sequential(nn.Dropout(0.1))
    net.forward = lambda x, noise_t, noise_u=None: x  # a net with dropout but no dropout_seed
    with pytest.raises(ValueError, match="dropout_seed"):
        L.BCTLoss()(BCM(net), torch.zeros(2, 1, 2, 2), step=0)


def _grads(model, loss, x, seed=1):
    model.zero_grad(set_to_none=True)
    loss(model, x, step=0, generator=torch.Generator().manual_seed(seed)).mean().backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_target_gradient_flows_through_input_only(monkeypatch):
    model = BCM(tiny_unet(True, dropout=0.1))
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    g_bct = _grads(model, L.BCTLoss(), x)
    g_ct = _grads(model, L.BCTLoss(bidirectional=False), x)
    diff = sum((a - b).norm() for a, b in zip(g_bct, g_ct))
    assert diff > 1e-3 * sum(a.norm() for a in g_ct)  # the BCT term contributes a gradient

    # Oracle: the same loss with the target as a frozen copy (requires_grad False), outer call not under no_grad.
    frozen = copy.deepcopy(model).requires_grad_(False)
    monkeypatch.setattr(L, "_target", lambda m, xx, t, **cond: frozen(xx, t, **cond))
    g_ref = _grads(model, L.BCTLoss(), x)
    assert all(p.grad is None for p in frozen.parameters())
    for a, b in zip(g_bct, g_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)

    # Without the input path (target output detached) the gradient would be the CT one only: BCT must differ.
    monkeypatch.setattr(L, "_target", lambda m, xx, t, **cond: frozen(xx, t, **cond).detach())
    g_cut = _grads(model, L.BCTLoss(), x)
    assert sum((a - b).norm() for a, b in zip(g_cut, g_ct)) < 1e-6 * sum(a.norm() for a in g_ct)
    assert sum((a - b).norm() for a, b in zip(g_bct, g_cut)) > 1e-3 * sum(a.norm() for a in g_ct)


def test_dropout_masks_identical_across_the_four_passes():
    model = BCM(tiny_unet(True, dropout=0.3)).train()
    masks: dict[int, list[torch.Tensor]] = {}

    def hook(module, inputs, output):
        masks.setdefault(module.index, []).append((output == 0) & (inputs[0] != 0))

    layers = [m for m in model.net.modules() if isinstance(m, SyncDropout)]
    assert layers
    handles = [m.register_forward_hook(hook) for m in layers]
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    L.BCTLoss()(model, x, step=0, generator=torch.Generator().manual_seed(0))
    first = {k: v[0].clone() for k, v in masks.items()}
    for per_layer in masks.values():
        assert len(per_layer) == 4 and per_layer[0].any()
        assert all(torch.equal(m, per_layer[0]) for m in per_layer[1:])
    masks.clear()
    L.BCTLoss()(model, x, step=0, generator=torch.Generator().manual_seed(1))
    assert any(not torch.equal(first[k], v[0]) for k, v in masks.items())  # a new step draws new masks
    for h in handles:
        h.remove()


def test_edm_loss_weighting_and_conditioning():
    """With F = 0 the denoiser is D = c_skip x_sigma, so the per-sample loss has a closed form."""
    net = tiny_unet(False, cond_channels=3)
    with torch.no_grad():
        for p in net.out.parameters():
            p.zero_()
    rec = Recorder(EDMDenoiser(net))
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    cond = torch.rand(5, 3, 8, 8)
    loss = L.EDMLoss()
    values = loss(rec, x, generator=torch.Generator().manual_seed(0), cond=cond)
    assert values.shape == (5,)
    (_, sigma, _, kwargs), = rec.calls
    assert torch.equal(kwargs["cond"], cond)
    # Recompute the noise from the same generator: seed, ln sigma ~ N(-1.2, 1.2^2), z.
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 2**62, (), generator=g)
    sigma_ref = (torch.randn(5, generator=g) * 1.2 - 1.2).exp()
    z = torch.randn(x.shape, generator=g)
    assert torch.allclose(sigma, sigma_ref)
    s = sigma_ref.view(-1, 1, 1, 1)
    denoised = 0.25 / (s**2 + 0.25) * (x + s * z)
    ref = ((s**2 + 0.25) / (s * 0.5) ** 2).flatten() * (denoised - x).square().flatten(1).mean(1)
    assert torch.allclose(values, ref, rtol=1e-5)


def test_bcm_from_cm_reproduces_cm_up_to_boundary_scaling():
    net = tiny_unet(False)
    with torch.no_grad():  # break the zero-init so every layer matters
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cm = ConsistencyModel(net)
    bcm = bcm_from_cm(cm)
    assert bcm.net.config.bidirectional and isinstance(bcm, BCM)
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.01, 0.5, 3.0, 80.0])
    label = 250 * t.log()
    with torch.no_grad():
        for u in (torch.full((4,), SIGMA_MIN), torch.tensor([0.3, 7.0, 0.002, 40.0])):
            # The network ignores u at initialisation ...
            assert torch.allclose(bcm.net(x, label, 250 * u.log()), cm.net(x, label), atol=1e-6)
        # ... so f_BCM(x, t, sigma_min) - f_CM(x, t) is exactly the c_skip change (c_out is identical).
        diff = bcm.jump(x * t.view(-1, 1, 1, 1), t, SIGMA_MIN) - cm(x * t.view(-1, 1, 1, 1), t)
        c_bcm, o_bcm, _ = bcm_scalings(t, torch.full((4,), SIGMA_MIN))
        c_cm, o_cm, _ = cm_scalings(t)
        assert torch.allclose(o_bcm, o_cm)
        expected = (c_bcm - c_cm).view(-1, 1, 1, 1) * x * t.view(-1, 1, 1, 1)
        assert torch.allclose(diff, expected, atol=1e-5)
        assert expected.abs().max() > 1e-3  # the mismatch is real, not zero
    with pytest.raises(ValueError, match="already bidirectional"):
        bcm_from_cm(bcm)
