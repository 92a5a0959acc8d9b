"""Speed options (`restore.engine.acceleration`: --bf16, --channels-last, --compile) on `restore run` and
`restore-bench run`: close to the default on CPU, recorded, not part of the results' identity; and the GPU checks
(marked `gpu`, skipped without CUDA): a checkpoint loaded on CUDA, one suite cell with --bf16 --channels-last,
one training step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
import torch
from click.testing import CliRunner
from PIL import Image

from restore.app.io import write_png
from restore.engine.acceleration import Acceleration
from restore.engine.checkpoints import load_model, save_model
from restore.engine.networks import UNet, UNetConfig
from restore.engine.wrappers import BCM, EDMDenoiser

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]


@pytest.fixture(scope="module")
def bcm_path(tmp_path_factory) -> Path:
    """A tiny BCM whose output depends visibly on its weights (the zero-initialised last conv is not kept)."""
    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("cifar-tiny", bidirectional=True))
    torch.nn.init.normal_(net.out[-1].weight, std=0.02)
    path = tmp_path_factory.mktemp("models") / "bcm.safetensors"
    save_model(BCM(net), path)
    return path


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clean")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bicubic")
    for i in range(2):
        write_png(x[i].clamp(-1, 1), folder / f"im{i}.png")
    return folder


def _restore(clean: Path, out: Path, model: Path, *flags: str, device: str = "cpu") -> np.ndarray:
    from restore.app.cli import main

    args = ["run", str(clean), str(out), "--operator", "box:size=8", "--method", "bcm-inpaint", "--model", str(model),
            "--nfe", "2", "--degrade", "--device", device, "--no-progress", *flags]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return np.stack([np.asarray(Image.open(out / f"im{i}.png"), dtype=np.float64) for i in range(2)])


def _suite(clean: Path, bcm_path: Path) -> dict:
    """One cell: BCM inpainting, NFE 2, on the two clean images."""
    return {"dataset": str(clean), "images": 2, "metrics": ["psnr"], "operators": ["box:size=8"],
            "models": {"bcm": str(bcm_path)}, "methods": [{"name": "bcm-inpaint", "model": "bcm", "nfe": [2]}]}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12)))


def test_restore_run_speed_options_stay_close_to_the_default(clean, bcm_path, tmp_path):
    default = _restore(clean, tmp_path / "default", bcm_path)
    layout = _restore(clean, tmp_path / "cl", bcm_path, "--channels-last")
    assert np.abs(layout - default).max() <= 1  # same arithmetic in another memory layout: 8-bit rounding at most
    bf16 = _restore(clean, tmp_path / "bf16", bcm_path, "--bf16", "--channels-last")
    assert _psnr(bf16, default) > 30  # bf16 rounds the network's activations (8-bit mantissa)
    record = json.loads((tmp_path / "bf16" / "run.json").read_text())
    assert record["acceleration"] == {"bf16": True, "channels_last": True, "compile": False}
    # rounding only: the folder resumes under other speed options instead of refusing or redoing the images
    again = _restore(clean, tmp_path / "default", bcm_path, "--bf16")
    assert np.array_equal(again, default)


def test_benchmark_speed_options_stay_close_and_are_recorded(clean, bcm_path, tmp_path):
    from benchmarks.runner import run_suite
    from benchmarks.suites import parse_suite

    suite = parse_suite(_suite(clean, bcm_path), "t")
    run_suite(suite, tmp_path / "a", progress=False, device="cpu")
    run_suite(suite, tmp_path / "b", progress=False, device="cpu", acceleration=Acceleration(bf16=True,
                                                                                                channels_last=True))
    a, b = (pd.read_csv(tmp_path / d / "results.csv") for d in "ab")
    assert list(a.cell) == list(b.cell)  # same cell keys: speed options do not define a result
    assert np.allclose(a.value, b.value, atol=1.0)  # PSNR in dB
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert record["acceleration"] == {"bf16": True, "channels_last": True, "compile": False}


def test_options_are_applied_to_the_model(bcm_path):
    model = Acceleration(bf16=True, channels_last=True, compile=True).apply(load_model(bcm_path))
    assert model.autocast_dtype == torch.bfloat16
    conv = next(p for p in model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert model.net._compiled_call_impl is not None  # compiled lazily, on the first call
    plain = Acceleration().apply(load_model(bcm_path))
    assert plain.autocast_dtype is None and plain.net._compiled_call_impl is None


@pytest.mark.slow
def test_restore_run_compiled_matches_the_default(clean, bcm_path, tmp_path):
    default = _restore(clean, tmp_path / "default", bcm_path)
    compiled = _restore(clean, tmp_path / "compiled", bcm_path, "--compile")
    assert np.abs(compiled - default).max() <= 1


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_checkpoint_loads_on_cuda_and_agrees_with_cpu(bcm_path, device):
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), 10.0
    with torch.inference_mode():
        cpu = load_model(bcm_path).jump(x, t, 0.002)
        model = load_model(bcm_path, device=device)
        assert next(model.parameters()).device.type == "cuda"
        out = model.jump(x.to(device), t, 0.002)
        fast = Acceleration(bf16=True, channels_last=True).apply(model).jump(x.to(device), t, 0.002)
    assert torch.allclose(out.cpu(), cpu, atol=1e-4)
    assert (fast.cpu() - cpu).abs().max() < 0.05


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_one_suite_cell_on_cuda_with_bf16_and_channels_last(clean, bcm_path, tmp_path, device):
    from benchmarks.cli import main

    path = tmp_path / "t.toml"
    path.write_text(tomli_w.dumps(_suite(clean, bcm_path)))
    results = {}
    for name, flags in (("cpu", ["--device", "cpu"]), ("cuda", ["--device", device, "--bf16", "--channels-last"])):
        result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / name), "--no-progress", *flags])
        assert result.exit_code == 0, result.output
        results[name] = pd.read_csv(tmp_path / name / "results.csv")
    assert json.loads((tmp_path / "cuda" / "run.json").read_text())["environment"]["device"]["type"] == "cuda"
    assert (results["cuda"].nfe == 2).all()
    assert np.allclose(results["cuda"].value, results["cpu"].value, atol=1.0)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_one_training_step_on_cuda(npz, tmp_path, device):
    from training.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["edm", "--data", str(npz), "--out", str(out), "--preset", "cifar-tiny",
                                       "--steps", "1", "--batch", "4", "--no-progress", "--bf16", "--device", device])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 1 and np.isfinite(log[-1]["loss"])
    assert isinstance(load_model(out / "ema.safetensors"), EDMDenoiser)
