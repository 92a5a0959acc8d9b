"""Generation / inversion evaluation: exact against the Gaussian flow map, counted NFE, batch independence, CLI."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from benchmarks.cli import main
from benchmarks.generation import generate, image_grid, inversion_levels, reconstruct
from operators.utils import make_generators, randn, to_uint8
from restore.engine.checkpoints import save_model
from restore.engine.networks import UNet, UNetConfig
from restore.engine.oracles import GaussianFlow, oracle_bcm, oracle_cm, oracle_edm
from restore.engine.wrappers import BCM

MU, S = 0.3, 0.5
SHAPE = (3, 8, 8)


def test_inversion_levels():
    assert inversion_levels(1) == (0.07, 80.0) and inversion_levels(2) == (0.07, 15.0, 80.0)
    levels = inversion_levels(4)
    assert len(levels) == 5 and levels[0] == pytest.approx(0.07) and levels[-1] == pytest.approx(80.0)
    assert all(a < b for a, b in zip(levels[:-1], levels[1:]))
    with pytest.raises(ValueError):
        inversion_levels(0)


@pytest.mark.parametrize("nfe", [1, 2, 3, 4])
def test_bcm_samples_follow_the_exact_flow_and_ignore_batch_size(nfe):
    model = oracle_bcm(MU, S)
    x, counted = generate(model, 6, nfe, seed=3, batch_size=4, image_shape=SHAPE)
    assert counted == nfe and x.dtype == torch.uint8 and x.shape == (6, *SHAPE)
    assert torch.equal(x, generate(model, 6, nfe, seed=3, batch_size=5, image_shape=SHAPE)[0])
    if nfe == 1:  # one jump 80 -> sigma_min of the exact flow map
        z = randn((6, *SHAPE), make_generators(3, range(6)))
        expected = GaussianFlow(MU, S).flow(80.0 * z.double(), 80.0, model.sigma_min).float()
        assert (x.int() - to_uint8(expected).int()).abs().max() <= 1


def test_edm_generation_counts_heun_evaluations():
    for nfe in (7, 4):  # odd: Heun steps ending with an Euler step to 0; even: Heun steps ending at sigma_min
        x, counted = generate(oracle_edm(MU, S), 3, nfe, image_shape=SHAPE)
        assert counted == nfe and x.shape == (3, *SHAPE)
    with pytest.raises(ValueError, match=">= 1"):
        generate(oracle_edm(MU, S), 3, 0, image_shape=SHAPE)


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_cm_generation_spends_the_requested_nfe(nfe):
    x, counted = generate(oracle_cm(MU, S), 3, nfe, image_shape=SHAPE)
    assert counted == nfe and x.shape == (3, *SHAPE)


@pytest.mark.parametrize("nfe", [1, 2, 3])
def test_bcm_reconstruction_is_the_flow_map_of_the_noised_image(nfe):
    """Invert x + 0.07 z (a point at t = 0.07) and regenerate: with the exact flow map the result is the
    trajectory's point at sigma_min, whatever the intermediate levels (docs/methods.md#bcm-inversion)."""
    model, flow = oracle_bcm(MU, S), GaussianFlow(MU, S)
    x = flow.sample((4, *SHAPE), generator=torch.Generator().manual_seed(0)).double()
    rec = reconstruct(model, x, nfe, seed=1)
    x_noisy = x + 0.07 * randn(x.shape, make_generators(1, range(4)), dtype=x.dtype)
    torch.testing.assert_close(rec, flow.flow(x_noisy, 0.07, model.sigma_min), rtol=0, atol=1e-9)


def test_edm_ode_reconstruction_converges():
    model = oracle_edm(MU, S)
    x = GaussianFlow(MU, S).sample((4, *SHAPE), generator=torch.Generator().manual_seed(0)).double()
    errors = [(reconstruct(model, x, nfe) - x).square().mean().item() for nfe in (8, 32)]
    assert errors[1] < errors[0] / 10 and errors[1] < 1e-4
    with pytest.raises(ValueError, match="multiple"):
        reconstruct(model, x, 3)


def test_image_grid_layout():
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2) / 10
    grid = image_grid(images, nrow=3, pad=1)
    assert grid.shape == (3, 2 * 3 + 1, 3 * 3 + 1)
    assert grid[0, 1, 1] == 0 and grid[0, 1, 4] == pytest.approx(0.1) and grid[0, 4, 4] == pytest.approx(0.4)
    assert grid[0, 0, 0] == 1 and grid[0, 4, 7] == 1  # padding and the empty sixth cell are white


def test_generation_command_end_to_end(tmp_path, monkeypatch, single_thread):
    """Tiny random BCM on CIFAR-10: FID/KID rows per NFE, per-image inversion rows, grids, summary."""
    from conftest import shared_file

    monkeypatch.setenv("BCM_RESTORE_DATA", str(shared_file("cifar10_train.npz").parent))
    monkeypatch.setenv("BCM_RESTORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # Inception weights built here, offline
    config = UNetConfig.preset("cifar-tiny", bidirectional=True)
    torch.manual_seed(0)
    save_model(BCM(UNet(config)), tmp_path / "bcm.safetensors")
    result = CliRunner().invoke(main, ["generation", str(tmp_path / "bcm.safetensors"), "--out", str(tmp_path / "out"),
                                       "--n", "6", "--nfe", "1,2", "--inversion-nfe", "1", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "out" / "results.csv")
    fid = frame[frame.metric == "fid"]
    assert list(fid.nfe) == [1, 2] and (fid.value > 0).all() and all(math.isfinite(v) for v in fid.value)
    inversion = frame[frame.metric == "inversion_mse"]
    assert len(inversion) == 6 and set(inversion.nfe) == {2}  # one jump up, one down
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["fid"]) == {"1", "2"} and set(summary["inversion_mse"]) == {"2"}
    # 6 significant digits, not 6 decimals: small inversion errors keep their value
    assert summary["inversion_mse"]["2"] == pytest.approx(inversion.value.mean(), rel=1e-5)
    for name in ("samples_nfe1.png", "samples_nfe2.png", "inversion.png", "summary.md"):
        assert (tmp_path / "out" / name).is_file()


def test_generation_gamma_option():
    """--gamma takes a number in (0, 1] or obelm (O-BELM's per-step gamma); anything else is a usage error."""
    import click

    from benchmarks.cli import _bdia_gamma

    assert _bdia_gamma(None, None, "obelm") == "obelm" and _bdia_gamma(None, None, "0.96") == 0.96
    for bad in ("0", "1.5", "belm", "nan"):
        with pytest.raises(click.BadParameter, match="obelm"):
            _bdia_gamma(None, None, bad)
    x, counted = generate(oracle_edm(MU, S), 3, 10, image_shape=SHAPE, edm_sampler="bdia-edm", gamma="obelm")
    assert counted == 10 and x.shape == (3, *SHAPE)
