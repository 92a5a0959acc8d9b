"""Cost before compute (`restore-bench run --dry-run`, benchmarks.runner.cost): the counted NFE the run will report,
FLOPs against a closed-form count, totals that add up, and nothing written or restored."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import tomli_w
import torch
from click.testing import CliRunner
from conftest import analytic_forward_flops

from benchmarks.cli import main
from benchmarks.runner import run_suite
from benchmarks.runner.cost import BACKWARD_COST, THROUGHPUT_BATCH, TIMED_CALLS, measure_network
from benchmarks.suites import load_suite
from restore.app.io import write_png
from restore.engine.checkpoints import save_model
from restore.engine.networks import UNet, UNetConfig
from restore.engine.wrappers import BCM, EDMDenoiser
from restore.methods import register_method

CALLS: Counter = Counter()  # method -> images it was called on


@register_method("cost-test-free", blind=False, model="none", default_nfe=0)
def _free(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    """Network-free: the dry run must not call it."""
    CALLS["cost-test-free"] += len(y)
    return op.pinv(y) if op.linear else y


@register_method("cost-test-bcm", blind=True, model="bcm", default_nfe=1)
def _bcm(model, y, op, *, nfe, generator=None, callback=None, class_labels=None, extra: int = 0):
    """nfe + extra jumps (a count the budget alone does not give)."""
    CALLS["cost-test-bcm"] += len(y)
    x = op.pinv(y) if op.linear else y
    for _ in range(nfe + extra):
        x = model.jump(x, 1.0, model.sigma_min)
    return x


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny BCM and EDM checkpoints, referenced by path."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    paths = {"bcm": folder / "bcm.safetensors", "edm": folder / "edm.safetensors"}
    save_model(BCM(UNet(UNetConfig.preset("cifar-tiny", bidirectional=True))), paths["bcm"])
    save_model(EDMDenoiser(UNet(UNetConfig.preset("cifar-tiny"))), paths["edm"])
    return paths


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory, checkpoints) -> Path:
    """A suite on three 32x32 images with user checkpoints by path, a gradient method and two seeds."""
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(3, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bicubic")
    for i in range(3):
        write_png(x[i].clamp(-1, 1), folder / f"im{i}.png")
    suite = {"dataset": str(folder), "images": 3, "batch_size": 2, "metrics": ["psnr"], "seeds": [0, 1],
             "operators": ["box:size=8"], "models": {k: str(v) for k, v in checkpoints.items()},
             "methods": [{"name": "cost-test-free", "nfe": [0]},
                         {"name": "cost-test-bcm", "model": "bcm", "nfe": [1, 2], "hparams": {"extra": 1}},
                         {"name": "dps", "model": "edm", "nfe": [2]}]}
    path = tmp_path_factory.mktemp("suite") / "tiny.toml"
    path.write_text(tomli_w.dumps(suite))
    return path


def _dry_run(*args: str) -> dict:
    result = CliRunner().invoke(main, ["run", *args, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_dry_run_counts_what_the_run_counts_and_totals_add_up(suite_file, tmp_path):
    CALLS.clear()
    out = tmp_path / "out"
    cost = _dry_run(str(suite_file), "--out", str(out), "--device", "cpu")
    assert not out.exists()  # nothing written, not even the folder
    # the network-free method never runs; model methods run once per (entry, NFE) on ONE image, seeds share it
    assert CALLS == {"cost-test-bcm": 2}
    cells = pd.DataFrame(cost["cells"])
    assert len(cells) == 2 * (1 + 2 + 1) and set(cells.seed) == {0, 1} and set(cells.images) == {3}
    gflop = cost["networks"][next(m for m in cost["networks"] if m.endswith("bcm.safetensors"))]["gflop_forward"]
    assert gflop == pytest.approx(0.66, rel=0.05)  # cifar-tiny at 32x32 (docs/design.md#training-compute: 2.0 / 3)
    per_image = cells.gflop_forward * (cells.nfe + BACKWARD_COST * cells.nfe_backward)
    assert cells.gflop_per_image.to_list() == pytest.approx(per_image.to_list())
    assert cells.gflop_total.to_list() == pytest.approx((cells.images * per_image).to_list())
    run = cells[cells.nfe > 0]
    speed = run.model.map(lambda m: cost["networks"][m]["gflop_per_second"])
    assert run.est_seconds.to_list() == pytest.approx((run.gflop_total / speed).to_list())
    assert (cells[cells.nfe == 0][["gflop_total", "est_seconds"]] == 0).all(axis=None)
    total = {"cells": 8, "gflop": cells.gflop_total.sum(), "seconds": cells.est_seconds.sum()}
    assert cost["total"] == pytest.approx({**total, **{f"{k}_left": v for k, v in total.items()}})  # nothing done
    assert not cost["resumed"] and (cells.restored == 0).all() and not cells.complete.any()
    assert cost["throughput_batch"] == THROUGHPUT_BATCH

    run_suite(load_suite(str(suite_file)), out, progress=False, device="cpu")
    counted = (pd.read_csv(out / "results.csv").groupby(["method", "nfe_budget", "seed"])[["nfe", "nfe_backward"]]
               .first())
    predicted = cells.set_index(["method", "nfe_budget", "seed"])[["nfe", "nfe_backward"]].sort_index()
    pd.testing.assert_frame_equal(predicted, counted.sort_index(), check_dtype=False)
    assert predicted.loc[("cost-test-bcm", 2, 0)].to_list() == [3, 0]  # nfe + extra
    assert predicted.loc[("dps", 2, 1)].to_list() == [2, 2]  # one forward and one backward per step


def test_dry_run_on_a_run_folder_counts_what_is_left(suite_file, tmp_path):
    out, suite = tmp_path / "out", load_suite(str(suite_file))
    run_suite(suite, out, limit=2, progress=False, device="cpu")  # 2 of the 3 images, every cell
    cost = _dry_run(str(suite_file), "--out", str(out), "--device", "cpu")
    cells = pd.DataFrame(cost["cells"])
    assert cost["resumed"] and (cells.restored == 2).all() and not cells.complete.any()
    assert cells.est_seconds_left.to_list() == pytest.approx((cells.est_seconds / 3).to_list())
    assert cost["total"]["cells_left"] == 8
    assert cost["total"]["gflop_left"] == pytest.approx(cells.gflop_total.sum() / 3)
    assert cost["total"]["seconds_left"] == pytest.approx(cells.est_seconds.sum() / 3)

    run_suite(suite, out, progress=False, device="cpu")
    result = CliRunner().invoke(main, ["run", str(suite_file), "--out", str(out), "--device", "cpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "left: 0 cells, 0 GFLOP, about 0 s" in result.output
    cells = pd.DataFrame(_dry_run(str(suite_file), "--out", str(out), "--device", "cpu")["cells"])
    assert (cells.restored == 3).all() and cells.complete.all() and (cells.est_seconds_left == 0).all()


def test_the_real_network_runs_only_to_be_measured(suite_file, checkpoints, monkeypatch):
    """Per model: one one-image forward under the FLOP counter and the timed batches, whatever the NFE."""
    from benchmarks.runner import execute

    calls: list[int] = []
    load = execute.load_model

    def counting_load(ref, device, acceleration):
        model, params = load(ref, device, acceleration)
        if model is not None:
                model.net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        return model, params

    monkeypatch.setattr("benchmarks.runner.cost.load_model", counting_load)
    _dry_run(str(suite_file), "--device", "cpu")
    assert sorted(calls) == sorted([1, *[THROUGHPUT_BATCH] * (1 + TIMED_CALLS)] * 2)


def test_forward_flops_match_a_closed_form_count():
    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("cifar-tiny", img_resolution=16, bidirectional=True))  # attention at 16x16
    x, t = torch.randn(1, 3, 16, 16), torch.full((1,), 100.0)
    measured, out = measure_network(net, x, t, noise_u=t / 2)
    expected = analytic_forward_flops(net, lambda: net(x, t, noise_u=t / 2))
    assert out.shape == x.shape and measured.gflop_forward * 1e9 == pytest.approx(expected, rel=1e-6)
    assert measured.gflop_per_second > 0


def test_json_needs_dry_run(suite_file):
    result = CliRunner().invoke(main, ["run", str(suite_file), "--json"])
    assert result.exit_code == 2 and "--json goes with --dry-run" in result.output


def test_builtin_quick_suite_dry_run(tmp_path):
    from conftest import shared_file

    shared_file("cifar10_test.npz")
    result = CliRunner().invoke(main, ["run", "quick", "--dry-run", "--device", "cpu", "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    suite = load_suite("quick")  # every (method entry, operator, NFE, seed) is one cell
    cells = sum(len(m.operators or suite.operators) * len(m.nfe) for m in suite.methods) * len(suite.seeds)
    assert f"total: {cells} cells" in result.output and "GFLOP/s on cpu" in result.output
    assert not (tmp_path / "q").exists()
