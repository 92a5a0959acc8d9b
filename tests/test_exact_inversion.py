"""Exact inversion on an EDM prior (restore.engine.exact_inversion) and the bdia-restore restorer
(restore.methods.inversion), against the Gaussian oracle (closed-form PF ODE) and the empirical
CIFAR-10 denoiser."""

from __future__ import annotations

import math

import pytest
import torch

from operators import build_operator
from restore.engine.exact_inversion import (
    bdia_invert,
    bdia_sample,
    ddim_invert,
    ddim_sample,
    edict_invert,
    edict_sample,
    obelm_gammas,
)
from restore.engine.oracles import GaussianFlow, oracle_edm, oracle_edm_empirical
from restore.engine.sampling import edm_ode_invert, sample_euler, sample_heun
from restore.engine.schedules import karras_sigmas
from restore.methods import get_method
from restore.methods.inversion import inversion_nfe, inversion_steps, restore_bdia_restore

MU, S, SMIN, SMAX = 0.3, 0.5, 0.002, 80.0
FLOW = GaussianFlow(MU, S)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(dtype=torch.float64, seed=1) -> torch.Tensor:
    return FLOW.sample((4, 3, 8, 8), generator=_gen(seed), dtype=torch.float64).to(dtype)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).square().mean().sqrt().item()


def round_trip(kind: str, n: int, dtype: torch.dtype, gamma=None, **kw) -> tuple[float, torch.Tensor]:
    """Invert data at sigma_min to sigma_max in n Karras steps and regenerate; returns (RMSE, inverted state)."""
    model, x0 = oracle_edm(MU, S), _data(dtype)
    down = karras_sigmas(n + 1, SMIN, SMAX, append_zero=False)
    up = down.flip(0)
    if kind == "ddim":
        top = ddim_invert(model, x0, up, **kw)
        rec = ddim_sample(model, top, down)
    elif kind == "edict":
        top = edict_invert(model, x0, up, **kw)
        rec = edict_sample(model, top, down, **kw)
        top = top[0]
    else:
        g = "obelm" if kind == "obelm" else gamma  # "obelm": obelm_gammas of each direction's levels
        top = bdia_invert(model, x0, up, g)
        rec = bdia_sample(model, top, down, g)
        top = top[0]
    return _rmse(rec, x0), top


# ------------------------------------------------------------------------------------- exact inversion
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
@pytest.mark.parametrize("kind,gamma,kw", [("bdia", 1.0, {}), ("bdia", 0.9, {}), ("obelm", None, {}),
                                           ("edict", None, {}), ("edict", None, {"leapfrog": False}),
                                           ("edict", None, {"p": 0.97})])
def test_bdia_and_edict_round_trips_are_exact(kind, gamma, kw, dtype, tol):
    err, _ = round_trip(kind, 30, dtype, gamma, **kw)
    assert err < tol
    assert err < 1e-2 * round_trip("ddim", 30, dtype)[0]  # the same trip with DDIM inversion is far from exact


@pytest.mark.parametrize("convention", ["standard", "current-level"])
def test_ddim_inversion_is_first_order_not_exact(convention):
    errs = [round_trip("ddim", n, torch.float64, convention=convention)[0] for n in (10, 40)]
    assert errs[1] > 1e-3
    assert 2.5 < errs[0] / errs[1] < 6  # O(1/N)


def test_ddim_is_the_euler_step_of_the_pf_ode():
    model, x0 = oracle_edm(MU, S), _data()
    down = karras_sigmas(8, SMIN, SMAX)  # ends in 0
    up = karras_sigmas(8, SMIN, SMAX, append_zero=False).flip(0)
    xT = FLOW.sample((4, 3, 8, 8), SMAX, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close(ddim_sample(model, xT, down), sample_euler(model, xT, down), rtol=0, atol=0)
    euler_up = edm_ode_invert(model, x0, up, method="euler")
    torch.testing.assert_close(ddim_invert(model, x0, up, convention="current-level"), euler_up, rtol=0, atol=0)
    assert _rmse(ddim_invert(model, x0, up), euler_up) > 1e-2  # the standard (diffusers) convention is not Euler


@pytest.mark.parametrize("gamma", [0.0, "zeros"])
def test_gamma_zero_is_ddim(gamma):
    model = oracle_edm(MU, S)
    down = karras_sigmas(12, SMIN, SMAX)
    xT = FLOW.sample((4, 3, 8, 8), SMAX, generator=_gen(2), dtype=torch.float64)
    g = torch.zeros(len(down)) if gamma == "zeros" else gamma
    assert torch.equal(bdia_sample(model, xT, down, g), ddim_sample(model, xT, down))
    assert not torch.allclose(bdia_sample(model, xT, down, 0.5), ddim_sample(model, xT, down))


def test_regeneration_needs_the_pair():
    """Restarting from the top state alone (DDIM first step) loses exactness (docs/methods.md#bdia)."""
    model, x0 = oracle_edm(MU, S), _data()
    down = karras_sigmas(21, SMIN, SMAX, append_zero=False)
    pair = bdia_invert(model, x0, down.flip(0))
    assert _rmse(bdia_sample(model, pair, down), x0) < 1e-10
    assert _rmse(bdia_sample(model, pair[0], down), x0) > 1e-4


def test_nfe_is_counted_through_the_model():
    model, x0 = oracle_edm(MU, S), _data()
    down = karras_sigmas(7, SMIN, SMAX, append_zero=False)  # 6 steps
    up = down.flip(0)
    expected = [(lambda: ddim_invert(model, x0, up), 6), (lambda: bdia_invert(model, x0, up), 6),
                (lambda: bdia_sample(model, x0, down), 6), (lambda: bdia_sample(model, (x0, x0), down), 5),
                (lambda: edict_invert(model, x0, up), 12), (lambda: edict_sample(model, x0, down), 12)]
    for fn, nfe in expected:
        with model.counter.counting() as count:
            fn()
        assert count.forward == nfe


def test_callback_and_gradients():
    model, x0 = oracle_edm(MU, S), _data().requires_grad_()
    calls = []
    top, _ = bdia_invert(model, x0, karras_sigmas(5, 0.1, 10.0, append_zero=False).flip(0), callback=calls.append)
    assert [c["i"] for c in calls] == [0, 1, 2, 3]
    assert set(calls[0]) == {"x", "i", "sigma", "sigma_next", "denoised"} and calls[0]["sigma"] == pytest.approx(0.1)
    top.sum().backward()  # no torch.no_grad inside: gradients reach the input
    assert x0.grad is not None and torch.isfinite(x0.grad).all()


def test_invalid_arguments():
    model, x0 = oracle_edm(MU, S), _data()
    down = karras_sigmas(5, SMIN, SMAX, append_zero=False)
    with pytest.raises(ValueError, match="gamma"):
        bdia_invert(model, x0, down.flip(0), 0.0)
    with pytest.raises(ValueError, match="one value per level"):
        bdia_sample(model, x0, down, [1.0, 1.0])
    with pytest.raises(ValueError, match="obelm"):
        bdia_sample(model, x0, down, "belm")
    assert torch.equal(bdia_sample(model, x0, down, "obelm"), bdia_sample(model, x0, down, obelm_gammas(down)))
    with pytest.raises(ValueError, match="ascending"):
        bdia_invert(model, x0, down)  # inversion levels must ascend
    with pytest.raises(ValueError, match="mixing"):
        edict_sample(model, x0, down, p=0.0)


def test_obelm_gammas_are_aligned_with_the_levels_and_second_order():
    down = karras_sigmas(11, SMIN, SMAX)
    g = obelm_gammas(down)
    torch.testing.assert_close(obelm_gammas(down.flip(0)), g.flip(0))
    h = down[:-1] - down[1:]
    torch.testing.assert_close(g[1:-1], (h[1:] / h[:-1]) ** 2)
    assert g[0] == 1 and g[-1] == 1 and bool((g[1:-1] < 1).all())
    # sampling accuracy vs the exact flow: O-BELM converges at second order, DDIM at first order
    model = oracle_edm(MU, S)
    xT = FLOW.sample((4, 3, 8, 8), SMAX, generator=_gen(2), dtype=torch.float64)
    ref = FLOW.flow(xT, SMAX, SMIN)

    def err(n, obelm):
        s = karras_sigmas(n + 1, SMIN, SMAX, append_zero=False)
        return _rmse(bdia_sample(model, xT, s, obelm_gammas(s) if obelm else 0.0), ref)

    assert err(50, True) / err(100, True) > 3.0
    assert 1.7 < err(50, False) / err(100, False) < 2.3
    assert err(100, True) < err(100, False) / 5


def test_bdia_parasitic_root_on_a_locally_constant_denoiser(cifar_test):
    """With D constant (a one-image empirical prior) BDIA follows x = c + sigma n exactly for any gamma, and a
    perturbation of the top state evolves with the roots 1/r and -gamma r of the grid ratio r: it grows about
    r-fold per step for gamma = 1, and decays for O-BELM's gamma ~ 1/r^2 (the reason bdia-restore uses O-BELM)."""
    model = oracle_edm_empirical(cifar_test[:1].double())
    n, c = 10, cifar_test[:1].double()
    down = torch.logspace(math.log10(5.0), math.log10(0.07), n + 1, dtype=torch.float64)  # geometric, r ~ 1.53
    noise = torch.randn(c.shape, generator=_gen(3), dtype=torch.float64)
    pair = (c + down[0].item() * noise, c + down[1].item() * noise)
    exact = c + down[-1].item() * noise
    delta = 1e-3 * torch.randn(c.shape, generator=_gen(4), dtype=torch.float64)
    r = (down[0] / down[1]).item()
    for gamma, lo, hi in [(1.0, r ** (n - 3), r ** n), (obelm_gammas(down), 0, 1 / r ** (n - 3))]:
        assert _rmse(bdia_sample(model, pair, down, gamma), exact) < 1e-12
        growth = _rmse(bdia_sample(model, (pair[0] + delta, pair[1]), down, gamma), exact) / _rmse(delta, 0 * delta)
        assert lo < growth < hi


def test_round_trip_error_table(capsys):
    """Round-trip RMSE (data std 0.5) on the Gaussian oracle, Karras sigma_min -> sigma_max, and the qualitative
    shape: exact methods at rounding level, DDIM first order and dtype independent, gamma = 0.5 growing as
    gamma^-N. The gamma = 0.5 blow-up is not rounding: the first (DDIM) inversion step seeds the parasitic mode,
    which the exact inverse recurrence multiplies by ~1/gamma per step (the inverted state is the same in fp32
    and fp64); the regeneration cancels it exactly, up to rounding relative to the huge inverted state."""
    steps, rows = (10, 50, 100), [("ddim", 0.0), ("bdia", 0.5), ("bdia", 0.9), ("bdia", 1.0), ("obelm", None),
                                  ("edict", None)]
    table, latent = {}, {}
    for dtype in (torch.float32, torch.float64):
        for kind, gamma in rows:
            for n in steps:
                table[kind, gamma, dtype, n], top = round_trip(kind, n, dtype, gamma)
                latent[kind, gamma, dtype, n] = top.double().abs().max().item()
    with capsys.disabled():
        print("\nround-trip RMSE      " + "  ".join(f"{d} N={n:<4d}" for d in ("fp32", "fp64") for n in steps))
        for kind, gamma in rows:
            name = {"ddim": "DDIM (gamma=0)", "obelm": "O-BELM", "edict": "EDICT p=0.93"}.get(kind, f"BDIA g={gamma}")
            print(f"{name:20s} " + "  ".join(f"{table[kind, gamma, d, n]:10.1e}"
                                             for d in (torch.float32, torch.float64) for n in steps))
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-3)):
        for kind, gamma in rows[2:]:
            assert all(table[kind, gamma, dtype, n] < tol for n in steps), (kind, gamma, dtype)
    ddim = [table["ddim", 0.0, torch.float64, n] for n in steps]
    assert ddim[0] > ddim[1] > ddim[2] > 1e-2
    assert all(table["ddim", 0.0, torch.float32, n] == pytest.approx(table["ddim", 0.0, torch.float64, n], rel=1e-3)
               for n in steps)
    assert table["bdia", 0.5, torch.float64, 10] < 1e-10
    for dtype in (torch.float32, torch.float64):
        rate = math.log(table["bdia", 0.5, dtype, 100] / table["bdia", 0.5, dtype, 50]) / 50
        assert 0.6 * math.log(2) < rate < 1.4 * math.log(2)
        assert latent["bdia", 0.5, dtype, 100] > 1e15
    # seeded by the DDIM step, not by rounding: fp32 and fp64 agree although their epsilons differ by 1e9
    assert 0.5 < latent["bdia", 0.5, torch.float32, 100] / latent["bdia", 0.5, torch.float64, 100] < 2


# ------------------------------------------------------------------------------------------ restorer
def test_registered():
    method = get_method("bdia-restore")
    assert method.fn is restore_bdia_restore and method.model == "edm" and not method.blind


@pytest.mark.parametrize("method,nfe,steps,counted", [("bdia", 20, 10, 20), ("bdia", 1, 0, 1), ("bdia", 3, 1, 2),
                                                      ("ddim", 20, 9, 19), ("ddim", 2, 0, 1), ("edict", 20, 4, 17),
                                                      ("edict", 4, 0, 1), ("edict", 5, 1, 5)])
def test_restorer_nfe(method, nfe, steps, counted):
    assert inversion_steps(method, nfe) == steps and inversion_nfe(method, steps) == counted
    model, x = oracle_edm(MU, S), _data(torch.float32)
    op = build_operator("box:size=4")
    with model.counter.counting() as count:
        restore_bdia_restore(model, op(x), op, nfe=nfe, method=method, generator=_gen(0))
    assert count.forward == counted <= max(nfe, 1)


@pytest.mark.parametrize("method,gamma", [("bdia", "obelm"), ("bdia", 0.95), ("edict", None)])
def test_without_data_consistency_exact_inversion_is_a_no_op(method, gamma):
    """dc="none": the exact trip sigma_in -> sigma_s -> sigma_in is the identity, so the output is the
    final denoising D(x_start; sigma_in) for any sigma_s; DDIM's approximate trip is not."""
    model, x = oracle_edm(MU, S), _data(torch.float32)
    op = build_operator("box:size=4")
    y = op(x)
    expected = model(op.pinv(y), 0.07).clamp(-1, 1)
    kw = {"nfe": 40, "noise": 0.0, "dc": "none"}
    for sigma_s in (1.0, 20.0):
        out = restore_bdia_restore(model, y, op, method=method, gamma=gamma or 1.0, sigma_s=sigma_s, **kw)
        assert _rmse(out, expected) < 1e-4
    assert _rmse(restore_bdia_restore(model, y, op, method="ddim", **kw), expected) > 1e-2


@pytest.mark.parametrize("spec", ["box:size=16", "jpeg:quality=10"])
@pytest.mark.parametrize("method,dc", [("bdia", "step"), ("ddim", "step"), ("edict", "end")])
def test_restorer_reduces_error_with_an_empirical_prior(cifar_test, spec, method, dc):
    prior, x = cifar_test[:16], cifar_test[:4]
    op = build_operator(spec)
    y = op(x)
    model = oracle_edm_empirical(prior)
    x_hat = restore_bdia_restore(model, y, op, nfe=20, method=method, dc=dc, generator=[_gen(i) for i in range(4)])
    degraded = op.pinv(y) if op.linear else y
    err = (x_hat - x).square().flatten(1).mean(1)
    base = (degraded - x).square().flatten(1).mean(1)
    assert bool((err < base / 2).all()), (err, base)


def test_projecting_makes_a_linear_operator_consistent():
    model, x = oracle_edm(MU, S), _data(torch.float32)
    op = build_operator("box:size=4")
    y = op(x)
    for dc in ("step", "end"):
        assert (op(restore_bdia_restore(model, y, op, nfe=10, dc=dc, generator=_gen(0))) - y).abs().max() < 1e-6
    assert (op(restore_bdia_restore(model, y, op, nfe=10, dc="none", generator=_gen(0))) - y).abs().max() > 1e-2


def test_restorer_is_per_image(cifar_test):
    """Per-image generators: an image's result does not depend on the batch it is restored in."""
    model, x = oracle_edm_empirical(cifar_test[:8]), cifar_test[8:11]
    op = build_operator("box:size=8")
    y = op(x)
    batch = restore_bdia_restore(model, y, op, nfe=8, generator=[_gen(i) for i in range(3)])
    alone = restore_bdia_restore(model, y[1:2], op, nfe=8, generator=[_gen(1)])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-4)
    # Another seed gives another result. Not checked on this memorising prior: it maps every seed's noisy start onto
    # the same training image (outputs differ by ~1e-7, rounding), so use the Gaussian prior, which keeps the noise.
    gauss = oracle_edm(MU, S)
    other = restore_bdia_restore(gauss, y, op, nfe=8, generator=_gen(5))
    assert (other - restore_bdia_restore(gauss, y, op, nfe=8, generator=[_gen(i) for i in range(3)])).abs().max() > 1e-2


def test_restorer_rejects_bad_hyper_parameters():
    model, x = oracle_edm(MU, S), _data(torch.float32)
    op = build_operator("box:size=4")
    for kw, match in [({"method": "rk4"}, "method"), ({"dc": "always"}, "dc"),
                      ({"sigma_in": 5.0, "sigma_s": 1.0}, "sigma_in"), ({"noise": -1.0}, "noise")]:
        with pytest.raises(ValueError, match=match):
            restore_bdia_restore(model, op(x), op, nfe=4, **kw)


# ------------------------------------------------------------------------------------------------ BDIA-EDM
@pytest.mark.parametrize("gamma", [0.5, 1.0, "obelm"])
def test_bdia_edm_round_trip_is_exact_at_heun_cost(gamma):
    """BDIA-EDM (heun=True): gamma = 0 is EDM's Heun sampler itself; the inversion is exact in fp64; sampling
    costs Heun's 2 steps - 1 NFE, inversion and regeneration from the pair 2 per step each."""
    model, x0 = oracle_edm(MU, S), _data()
    xT = FLOW.sample((4, 3, 8, 8), SMAX, generator=_gen(2), dtype=torch.float64)
    assert torch.equal(bdia_sample(model, xT, karras_sigmas(18, SMIN, SMAX), 0.0, heun=True),
                       sample_heun(model, xT, karras_sigmas(18, SMIN, SMAX)))
    with model.counter.counting() as tally:
        bdia_sample(model, xT, karras_sigmas(18, SMIN, SMAX), gamma, heun=True)
    assert tally.forward == 35
    down = karras_sigmas(11, SMIN, SMAX, append_zero=False)
    with model.counter.counting() as tally:
        pair = bdia_invert(model, x0, down.flip(0), gamma, heun=True)
        assert tally.forward == 20
        rec = bdia_sample(model, pair, down, gamma, heun=True)
    assert tally.forward == 38 and _rmse(rec, x0) < 1e-10
    assert _rmse(bdia_sample(model, pair, down, gamma), x0) > 1e-4  # the Heun pair is not a DDIM pair


def test_bdia_edm_with_obelm_gammas_is_as_accurate_as_heun():
    """On a Karras grid a constant gamma lets BDIA-EDM's parasitic root -gamma r (r = sigma_i / sigma_{i+1}, large
    at the noise end) grow, so on coarse grids gamma = 0.5 is far off the flow; O-BELM's gamma ~ 1/r^2 damps it and
    BDIA-EDM lands where Heun does. Prior: the empirical denoiser of 256 random 8x8 images (dense enough that the
    trajectories do not all collapse onto one image); error against a 400-step Heun solution."""
    images = torch.rand((256, 3, 8, 8), generator=_gen(5), dtype=torch.float64) * 2 - 1
    model = oracle_edm_empirical(images)
    xT = SMAX * torch.randn((32, 3, 8, 8), generator=_gen(6), dtype=torch.float64)
    ref = sample_heun(model, xT, karras_sigmas(400, SMIN, SMAX))
    for steps in (5, 6, 8):  # (a memorising prior: at some step counts every method lands on training images)
        s = karras_sigmas(steps, SMIN, SMAX)
        heun = _rmse(sample_heun(model, xT, s), ref)
        assert heun > 1e-2  # a coarse grid, far from the reference
        assert _rmse(bdia_sample(model, xT, s, "obelm", heun=True), ref) < 1.05 * heun
        assert _rmse(bdia_sample(model, xT, s, 0.5, heun=True), ref) > 10 * heun


@pytest.mark.parametrize("sampler, exact", [("heun", False), ("ddim", False), ("bdia-edm", True), ("bdia", True),
                                             ("edict", True)])
def test_generation_samplers_cost_their_nfe_and_exact_ones_reconstruct(sampler, exact):
    """restore-bench generation's EDM samplers: sampling costs exactly the NFE asked for; inverting with nfe up
    and regenerating on the same levels is exact (rounding) for BDIA-EDM, BDIA and EDICT, not for Heun / DDIM."""
    from benchmarks.generation import edm_levels, generate, reconstruct

    model = oracle_edm(MU, S)
    assert len(edm_levels(35, SMIN, SMAX)) == 19 and float(edm_levels(35, SMIN, SMAX)[-1]) == 0
    assert len(edm_levels(10, SMIN, SMAX)) == 6 and float(edm_levels(10, SMIN, SMAX)[-1]) == SMIN
    x, counted = generate(model, 4, 10, batch_size=4, image_shape=(3, 8, 8), edm_sampler=sampler, gamma=0.9)
    assert counted == 10 and x.shape == (4, 3, 8, 8)
    x0 = _data(torch.float32)[:2].clamp(-1, 1)
    with model.counter.counting() as tally:
        rec = reconstruct(model, x0, 20, edm_sampler=sampler, gamma=0.9)
    per_step = 2 if sampler in ("heun", "bdia-edm", "edict") else 1
    assert tally.forward == 40 - (per_step if exact and sampler != "edict" else 0)
    assert (_rmse(rec, x0) < 1e-4) == exact
    with pytest.raises(ValueError, match="unknown EDM sampler"):
        generate(model, 2, 10, image_shape=(3, 8, 8), edm_sampler="dpm")
    if per_step == 2:
        with pytest.raises(ValueError, match="multiple"):
            reconstruct(model, x0, 3, edm_sampler=sampler)
