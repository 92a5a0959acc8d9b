"""One seed rule for every tool (restore.runtime.seeds): the same image, operator, method, NFE and seed give the
same restored PNG from `restore run --degrade`, from `restore-bench run` and from the Python API, whatever the
batch size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from benchmarks.cli import main as bench_cli
from operators import build_operator
from restore import load_model, measurement_generators, restoration_generators
from restore.app.cli import main as restore_cli
from restore.app.io import read_image, write_png
from restore.methods import get_method

IDS = [f"im{i}" for i in range(4)]
# bcm-inpaint on random boxes with noise: measurement randomness (boxes, noise) and restoration noise both count
CASE = {"operator": "randbox:size=10,noise=0.05", "method": "bcm-inpaint", "model": "bcm-cifar10", "nfe": 2,
        "seed": 3}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clean")
    low = torch.rand(len(IDS), 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=32, mode="bicubic").clamp(-1, 1)
    for i, image_id in enumerate(IDS):
        write_png(x[i], folder / f"{image_id}.png")
    return folder


def _restore_run(clean: Path, out: Path, batch_size: int) -> dict[str, bytes]:
    result = CliRunner().invoke(restore_cli, [
        "run", str(clean), str(out), "--operator", CASE["operator"], "--method", CASE["method"],
        "--model", CASE["model"], "--nfe", str(CASE["nfe"]), "--degrade", "--seed", str(CASE["seed"]),
        "--batch-size", str(batch_size), "--no-progress"])
    assert result.exit_code == 0, result.output
    return {i: (out / f"{i}.png").read_bytes() for i in IDS}


def _bench_run(clean: Path, tmp_path: Path) -> dict[str, bytes]:
    suite = tmp_path / "seeds.toml"
    suite.write_text(
        f'dataset = "{clean.as_posix()}"\nimages = {len(IDS)}\nbatch_size = 3\noperators = ["{CASE["operator"]}"]\n'
        f'metrics = ["psnr"]\nseeds = [{CASE["seed"]}]\n[models]\nbcm = "{CASE["model"]}"\n'
        f'[[methods]]\nname = "{CASE["method"]}"\nmodel = "bcm"\nnfe = [{CASE["nfe"]}]\n')
    out = tmp_path / "bench"
    result = CliRunner().invoke(bench_cli, ["run", str(suite), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    found = {}
    for image_id in IDS:
        paths = [p for p in out.rglob(f"{image_id}.png") if CASE["method"] in p.as_posix()]
        assert len(paths) == 1, paths
        found[image_id] = paths[0].read_bytes()
    return found


def test_restore_run_and_benchmark_agree_byte_for_byte(clean, tmp_path):
    one = _restore_run(clean, tmp_path / "b1", batch_size=1)
    four = _restore_run(clean, tmp_path / "b4", batch_size=4)
    bench = _bench_run(clean, tmp_path)
    assert one == four  # independent of the batch size
    assert one == bench  # the same image from both tools
    assert len(set(one.values())) == len(IDS)  # and the images do differ (the check is not vacuous)


def test_python_api_follows_the_same_rule(clean, tmp_path):
    """The generators a Python user builds from `restore`'s seed functions reproduce `restore run`."""
    files = _restore_run(clean, tmp_path / "cli", batch_size=2)
    x = torch.stack([read_image(clean / f"{i}.png") for i in IDS])
    ids = [f"{i}.png" for i in IDS]  # a folder image's id is its relative path
    gens = measurement_generators(CASE["seed"], ids)
    op = build_operator(CASE["operator"]).draw(x.shape, gens)
    y = op.measure(x, gens)
    with torch.inference_mode():
        x_hat = get_method(CASE["method"])(load_model(CASE["model"]), y, op, nfe=CASE["nfe"],
                                           generator=restoration_generators(CASE["seed"], ids))
    for k, image_id in enumerate(IDS):
        write_png(x_hat[k], tmp_path / f"{image_id}.png")
        assert (tmp_path / f"{image_id}.png").read_bytes() == files[image_id]
