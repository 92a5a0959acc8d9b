"""The papers' protocol suites (bcm-paper-jpeg, imagenet256-dps, cifar10-edm) end to end on stand-ins.

Each built-in suite runs with its own operators, methods, model aliases and label rule, on small stand-in models
(random weights, the suite's image size and conditioning) written to tmp_path and passed as the suite's
``--model`` aliases, and on a few real images. To fit CI the images, the FID reference and the NFE budgets are cut
(each method keeps its smallest budget, at most 4); everything else is the shipped suite. The dry run predicts the
counted NFE of every cell of the full suite.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import shared_file

from benchmarks.cli import main as bench_main
from benchmarks.runner import run_suite
from benchmarks.suites import load_suite
from operators import build_operator
from restore.app.io import write_png
from restore.engine.checkpoints import save_model
from restore.engine.networks import UNet, UNetConfig, count_parameters
from restore.engine.wrappers import VPEpsDenoiser, get_wrapper
from restore.methods import get_method


def _random(net: UNet, seed: int) -> UNet:
    g = torch.Generator().manual_seed(seed)
    torch.nn.utils.vector_to_parameters(torch.randn(count_parameters(net), generator=g) * 0.02, net.parameters())
    return net.eval()


def _stand_in(path, kind: str, config: UNetConfig, seed: int = 0, **wrapper):
    net = _random(UNet(dataclasses.replace(config, bidirectional=kind == "bcm")), seed)
    model = VPEpsDenoiser(net, **wrapper) if kind == "vp-eps" else get_wrapper(kind)(net, **wrapper)
    return save_model(model, path)


def _small(suite, dataset: str, images: int, models: dict, fid_images: int):
    """The suite with its budgets, images and FID reference cut to CI size (module docstring)."""
    methods = tuple(dataclasses.replace(m, nfe=(min(min(m.nfe), 4),)) for m in suite.methods)
    return dataclasses.replace(suite, dataset=dataset, images=images, methods=methods,
                               models={**suite.models, **{k: str(v) for k, v in models.items()}},
                               fid=dataclasses.replace(suite.fid, images=fid_images))


def _run(suite, out) -> pd.DataFrame:
    summary = run_suite(suite, out, device="cpu", progress=False)
    assert summary["failures"] == []
    return _check_results(out, suite)


def _check_results(out, suite) -> pd.DataFrame:
    frame = pd.read_csv(out / "results.csv")
    cells = set(zip(frame["method"], frame["operator"]))
    expected = {(m.name, op) for m in suite.methods for op in (m.operators or suite.operators)
                if get_method(m.name).supports(build_operator(op))}
    assert expected - cells == set(), f"cells without results: {expected - cells}"
    assert frame["value"].notna().all() and {"psnr", "fid"} <= set(frame["metric"])
    return frame


def _dry_run(name: str, models: dict, data: str):
    args = ["run", name, "--dry-run", "--json", "--data", data]
    for alias, path in models.items():
        args += ["--model", f"{alias}={path}"]
    result = CliRunner().invoke(bench_main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_bcm_paper_jpeg_runs_with_class_labels(tmp_path):
    """ImageNet-64 protocol: class-conditional BCM / CM / EDM stand-ins (1000 classes) on Tiny-ImageNet val (ImageNet
    classes, the documented stand-in for ImageNet-64 val); every model call gets the images' labels."""
    shared_file("tinyimagenet200_val_jpeg.npz")
    config = UNetConfig.preset("cifar-tiny", img_resolution=64, attention_resolutions=(32,), num_classes=1000)
    models = {kind: _stand_in(tmp_path / f"{kind}.safetensors", kind, config, seed=i)
              for i, kind in enumerate(("bcm", "cm", "edm"))}
    suite = load_suite("bcm-paper-jpeg")
    assert suite.class_labels and set(suite.models) == {"bcm", "cm", "edm"}
    small = _small(suite, "tinyimagenet", 3, models, fid_images=6)
    _run(small, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert "class_labels" in json.dumps(record)

    plan = _dry_run("bcm-paper-jpeg", models, "tinyimagenet")
    assert {(c["method"], c["nfe"]) for c in plan["cells"]} >= {("bcm-jpeg", 4), ("cm-jpeg", 1), ("dps", 100)}
    assert not (tmp_path / "results").exists()


def test_imagenet256_dps_runs_on_a_vp_epsilon_prior(tmp_path, cifar_test):
    """The DPS protocol's four noisy tasks at 256 px on a VP-epsilon (guided-diffusion kind) stand-in and a folder of
    256x256 images (CIFAR-10 images upsampled)."""
    folder = tmp_path / "val"
    folder.mkdir()
    for i, image in enumerate(F.interpolate(cifar_test[:2], size=256, mode="bilinear")):
        write_png(image[None], folder / f"img{i}.png")
    config = UNetConfig(img_resolution=256, model_channels=32, channel_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1,
                        attention_resolutions=(), num_head_channels=32, qkv_norm=False, scale_shift_norm=True)
    models = {"adm": _stand_in(tmp_path / "adm.safetensors", "vp-eps", config)}
    suite = load_suite("imagenet256-dps")
    assert {op.split(":")[0] for op in suite.operators} == {"randbox", "randmask", "down", "blur"}
    assert all("noise=0.05" in op for op in suite.operators)
    small = _small(suite, str(folder), 2, models, fid_images=2)
    frame = _run(small, tmp_path / "out")
    assert set(frame.loc[frame["method"] == "ddrm", "operator"]) == {"randbox:size=128,noise=0.05",
                                                                      "randmask:p=0.7,noise=0.05"}
    plan = _dry_run("imagenet256-dps", models, str(folder))
    assert {c["nfe"] for c in plan["cells"] if c["method"] == "dps"} == {1000}


def test_cifar10_edm_runs_on_a_user_prior(tmp_path):
    """The zero-shot baselines and BDIA with the EDM prior given as --model edm=PATH (here the bundled tiny one)."""
    suite = load_suite("cifar10-edm")
    assert suite.models == {"edm": ""}
    small = _small(suite, "cifar10", 2, {"edm": "edm-cifar10"}, fid_images=4)
    _run(small, tmp_path / "out")
    with pytest.raises(ValueError, match="pass --model edm=PATH"):
        run_suite(suite, tmp_path / "unset", device="cpu", progress=False)
