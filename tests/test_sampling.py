"""Schedules, plans and samplers checked against the closed-form Gaussian PF-ODE
(restore.engine.schedules / sampling)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import GAUSSIAN_MU as MU  # the data of the `g` fixture
from conftest import GAUSSIAN_S as S

from operators.utils import make_generators
from restore.engine.oracles import EmpiricalDenoiser, GaussianFlow, oracle_bcm, oracle_cm, oracle_edm
from restore.engine.sampling import (
    edm_ode_invert,
    sample_ancestral,
    sample_bcm,
    sample_cm_multistep,
    sample_euler,
    sample_heun,
    sample_onestep,
    sample_plan,
    sample_zigzag,
)
from restore.engine.schedules import (
    BCM_PAPER_SCHEDULES,
    Jump,
    Renoise,
    ancestral_plan,
    bcm_paper_plan,
    check_plan,
    cm_multistep_plan,
    karras_sigmas,
    plan_nfe,
    zigzag_plan,
)

SMIN, SMAX = 0.002, 80.0
F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def x_T(g):
    """A float64 batch from the exact marginal at sigma_max."""
    return g.sample((4, 3, 8, 8), sigma=SMAX, generator=_gen(1), dtype=F64)


# ---------------------------------------------------------------- schedules and plans

def test_karras_sigmas():
    s = karras_sigmas(10, SMIN, SMAX)
    assert s.shape == (11,) and s.dtype == F64
    assert s[0] == SMAX and s[-2] == SMIN and s[-1] == 0 and bool((s[:-1] > s[1:]).all())
    # Karras et al. 2022, Eq. 5: sigma^(1/rho) is uniformly spaced; rho = 1 is a uniform grid
    steps = s[:-1] ** (1 / 7)
    torch.testing.assert_close(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(9))
    torch.testing.assert_close(karras_sigmas(5, 1.0, 5.0, rho=1.0, append_zero=False),
                               torch.tensor([5.0, 4, 3, 2, 1], dtype=F64))
    assert karras_sigmas(1, append_zero=False).tolist() == [SMAX]
    with pytest.raises(ValueError):
        karras_sigmas(0)


def test_bcm_paper_plans_are_the_table():
    """docs/methods.md#bcm-sampling: chains and NFE for 1..4."""
    J, R = Jump, Renoise
    expected = {
        1: (J(80, 0.002),),
        2: (J(80, 2.4), J(2.4, 0.002)),
        3: (J(80, 0.002), R(0.1), J(0.1, 1.2), J(1.2, 0.002)),
        4: (J(80, 3.0), J(3.0, 0.002), R(0.12), J(0.12, 0.4), J(0.4, 0.002)),
    }
    for nfe, plan in expected.items():
        assert bcm_paper_plan(nfe) == plan and plan_nfe(plan) == nfe
    assert sorted(BCM_PAPER_SCHEDULES) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="NFE"):
        bcm_paper_plan(5)


def test_plan_validation():
    with pytest.raises(ValueError, match="starts at"):
        check_plan([Jump(80, 1.0), Jump(2.0, 0.002)])
    with pytest.raises(ValueError, match="start with a Jump"):
        check_plan([Renoise(0.1), Jump(0.1, 0.002)])
    with pytest.raises(ValueError):
        check_plan([Jump(80, 0.0)])
    with pytest.raises(ValueError):
        cm_multistep_plan([80, 100])
    assert ancestral_plan([0.07, 15, 80]) == (Jump(0.07, 15), Jump(15, 80))  # ascending = inversion
    plan = cm_multistep_plan(karras_sigmas(3), SMIN)  # trailing sigma_min and 0 dropped
    assert plan_nfe(plan) == 2 and plan[1].std == pytest.approx(math.sqrt(plan[1].sigma**2 - SMIN**2))


# ---------------------------------------------------------------- consistency samplers are exact with the oracle

def test_onestep_and_ancestral_equal_the_flow_map(g, x_T):
    model = oracle_bcm(MU, S)
    exact = g.flow(x_T, SMAX, SMIN)
    torch.testing.assert_close(sample_onestep(model, x_T), exact, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sample_ancestral(model, x_T, [80, 15, 2.4, 0.3, SMIN]), exact, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sample_onestep(oracle_cm(MU, S), x_T), exact, rtol=1e-10, atol=1e-10)


def _replay(g, x, plan, generator):
    """Run a plan with the closed-form flow map instead of a model."""
    for step in plan:
        if isinstance(step, Jump):
            x = g.flow(x, step.t, step.u)
        else:
            std = step.sigma if step.std is None else step.std
            x = x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


@pytest.mark.parametrize("nfe", [1, 2, 3, 4])
def test_sample_bcm_equals_closed_form_replay(g, x_T, nfe):
    model = oracle_bcm(MU, S)
    out = sample_bcm(model, x_T, nfe, generator=_gen(7))
    torch.testing.assert_close(out, _replay(g, x_T, bcm_paper_plan(nfe), _gen(7)), rtol=1e-9, atol=1e-9)
    assert model.counter.forward == nfe


def test_zigzag_and_cm_multistep_equal_closed_form_replay(g, x_T):
    bcm = oracle_bcm(MU, S)
    amplify = ((0.1, 1.2), (0.05, 0.5))
    out = sample_zigzag(bcm, x_T, (80, 5.0, SMIN), amplify, generator=_gen(3))
    torch.testing.assert_close(out, _replay(g, x_T, zigzag_plan((80, 5.0, SMIN), amplify), _gen(3)),
                               rtol=1e-9, atol=1e-9)
    assert bcm.counter.forward == 2 + 2 * len(amplify)
    for model in (oracle_cm(MU, S), oracle_bcm(MU, S)):  # CM multistep works for both (jumps end at sigma_min)
        out = sample_cm_multistep(model, x_T, [80, 0.7, 0.2], generator=_gen(4))
        torch.testing.assert_close(out, _replay(g, x_T, cm_multistep_plan([80, 0.7, 0.2]), _gen(4)),
                                   rtol=1e-9, atol=1e-9)
        assert model.counter.forward == 3


def test_cm_cannot_run_bcm_jumps(x_T):
    with pytest.raises(ValueError, match="sigma_min"):
        sample_bcm(oracle_cm(MU, S), x_T, 2)


def test_callback_payload(x_T):
    seen = []
    out = sample_bcm(oracle_bcm(MU, S), x_T, 3, generator=_gen(), callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2]
    assert [(d["sigma"], d["sigma_next"]) for d in seen] == [(80, SMIN), (0.1, 1.2), (1.2, SMIN)]
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_next", "denoised"}
    assert torch.equal(seen[-1]["denoised"], out) and seen[0]["x"] is x_T
    seen.clear()
    sample_heun(oracle_edm(MU, S), x_T, karras_sigmas(3), callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2] and seen[-1]["sigma_next"] == 0


@pytest.mark.parametrize("nfe", [1, 2, 3, 4])
def test_bcm_samples_have_the_data_distribution(nfe):
    """Statistical: samples from the Gaussian oracle BCM are N(mu, s^2) (2^16 scalars, tolerance > 4 s.e.)."""
    g, model = GaussianFlow(MU, S), oracle_bcm(MU, S)
    n = 1 << 16
    x = sample_bcm(model, g.sample((n, 1, 1, 1), sigma=SMAX, generator=_gen(nfe)), nfe, generator=_gen(10 + nfe))
    assert abs(x.mean().item() - MU) < 4.5 * S / math.sqrt(n)
    assert abs(x.std().item() - math.sqrt(S**2 + SMIN**2)) < 4.5 * S / math.sqrt(2 * n)


def test_per_image_generators_make_results_batch_independent(x_T):
    model = oracle_bcm(MU, S)
    ids = ["a", "b", "c", "d"]
    full = sample_bcm(model, x_T, 4, generator=make_generators(0, ids))
    parts = [sample_bcm(model, x_T[i:j], 4, generator=make_generators(0, ids[i:j])) for i, j in [(0, 1), (1, 4)]]
    torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=0)
    reordered = sample_bcm(model, x_T[[2, 0]], 4, generator=make_generators(0, ["c", "a"]))
    torch.testing.assert_close(reordered, full[[2, 0]], rtol=0, atol=0)
    other = sample_bcm(model, x_T, 4, generator=make_generators(1, ids))
    assert not torch.allclose(other, full)


def test_backward_through_a_sampler_is_counted(g):
    model = oracle_bcm(MU, S)
    x = g.sample((2, 3, 4, 4), sigma=SMAX, generator=_gen()).requires_grad_(True)
    with model.counter.counting() as n:
        sample_ancestral(model, x, [80, 2.4, SMIN]).sum().backward()
    assert (n.forward, n.backward) == (2, 2)
    ratio = math.sqrt((S**2 + SMIN**2) / (S**2 + SMAX**2))  # d x_0 / d x_T of the linear flow map
    torch.testing.assert_close(x.grad, torch.full_like(x, ratio), rtol=1e-4, atol=0)


# ---------------------------------------------------------------- EDM ODE samplers and inversion

def _heun_grid(n):
    return karras_sigmas(n, SMIN, SMAX, append_zero=False)  # ends at sigma_min: every step is a Heun step


@pytest.mark.parametrize("sampler,order", [(sample_heun, 2), (sample_euler, 1)])
def test_edm_sampler_convergence_order(g, x_T, sampler, order):
    model = oracle_edm(MU, S)
    exact = g.flow(x_T, SMAX, SMIN)
    errors = [(sampler(model, x_T, _heun_grid(n)) - exact).abs().max().item() for n in (32, 64, 128)]
    assert errors[0] > errors[1] > errors[2]
    measured = math.log2(errors[1] / errors[2])
    assert abs(measured - order) < 0.25, (errors, measured)


@pytest.mark.parametrize("n", [1, 5, 18])
def test_edm_sampler_nfe(x_T, n):
    model = oracle_edm(MU, S)
    sample_heun(model, x_T, karras_sigmas(n))  # last step to 0 is Euler (Karras Alg. 1)
    assert model.counter.forward == 2 * n - 1
    model.counter.reset()
    sample_euler(model, x_T, karras_sigmas(n))
    assert model.counter.forward == n


def test_euler_last_step_to_zero_returns_the_denoiser(g, x_T):
    sigmas = torch.tensor([SMAX, 1.0, 0.0], dtype=F64)
    seen = []
    out = sample_heun(oracle_edm(MU, S), x_T, sigmas, callback=seen.append)
    torch.testing.assert_close(out, seen[-1]["denoised"], rtol=1e-12, atol=1e-12)


def test_edm_ode_inversion_converges(g):
    model = oracle_edm(MU, S)
    x0 = g.sample((4, 3, 8, 8), generator=_gen(5), dtype=F64)
    invert_err, round_trip = [], []
    for n in (8, 16, 32):
        sigmas = _heun_grid(n)
        with model.counter.counting() as c:
            z = edm_ode_invert(model, x0, sigmas.flip(0))
        assert c.forward == 2 * (n - 1)
        invert_err.append(((z - g.flow(x0, SMIN, SMAX)).abs().max() / SMAX).item())
        round_trip.append((sample_heun(model, z, sigmas) - x0).abs().max().item())
    assert invert_err[0] > invert_err[1] > invert_err[2]
    assert round_trip[0] > round_trip[1] > round_trip[2] and round_trip[2] < 5e-3
    z = edm_ode_invert(model, x0, _heun_grid(16).flip(0), method="euler")
    assert model.counter.forward == sum(2 * (n - 1) + 2 * (n - 1) for n in (8, 16, 32)) + 15
    with pytest.raises(ValueError, match="ascending"):
        edm_ode_invert(model, x0, _heun_grid(4))
    with pytest.raises(ValueError, match="method"):
        edm_ode_invert(model, x0, _heun_grid(4).flip(0), method="rk4")


def test_heun_with_the_empirical_denoiser_lands_on_a_training_image():
    """The PF ODE of a finite image set ends on one of its images (the empirical prior memorises)."""
    images = torch.rand(8, 3, 8, 8, generator=_gen(2)) * 2 - 1
    x = sample_heun(EmpiricalDenoiser(images), SMAX * torch.randn(3, 3, 8, 8, generator=_gen(3)), karras_sigmas(18))
    dist = ((x[:, None] - images[None]) ** 2).flatten(2).mean(2).min(1).values
    assert dist.max() < 1e-4


def test_generic_plan_executor_matches_named_samplers(x_T):
    model = oracle_bcm(MU, S)
    torch.testing.assert_close(sample_plan(model, x_T, bcm_paper_plan(3), generator=_gen(9)),
                               sample_zigzag(model, x_T, generator=_gen(9)), rtol=0, atol=0)
