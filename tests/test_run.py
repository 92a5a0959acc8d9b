"""`restore run` / `restore methods` end to end on temporary folders, with test-local methods.

Checks: every readable image restored (grey, RGBA, sub-folders), bad files reported and skipped,
resume / skip / --overwrite, interrupted runs continue, --degrade is seeded per image (independent of
--batch-size), --reference metrics, tiling of non-native sizes (exact for a local method, counted
NFE per tile batch), the size error for box, one-line user errors, inference mode vs needs_grad.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from benchmarks.metrics import consistency_psnr, psnr
from operators import build_operator
from operators.utils import randn
from restore.app.cli import main
from restore.app.io import read_image
from restore.app.run import RunError, run_folder
from restore.engine.checkpoints import save_model
from restore.engine.networks import UNet, UNetConfig
from restore.engine.wrappers import BCM
from restore.methods import register_method

STATE = {"interrupt_after": None, "calls": 0, "inference_mode": []}


@register_method("test-pinv", blind=False, model="none", default_nfe=1)
def restore_test_pinv(model, y, op, *, nfe, generator=None, callback=None, class_labels=None, scale: float = 1.0):
    """Pseudo-inverse (identity for JPEG): deterministic and pixel-local."""
    STATE["calls"] += 1
    STATE["inference_mode"].append(torch.is_inference_mode_enabled())
    if STATE["interrupt_after"] is not None and STATE["calls"] > STATE["interrupt_after"]:
        raise KeyboardInterrupt
    return (op.pinv(y) if op.linear else y) * scale


@register_method("test-grad", blind=False, model="none", default_nfe=1, needs_grad=True)
def restore_test_grad(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    """Records whether autograd is available, as a DPS-style method would need."""
    STATE["inference_mode"].append(torch.is_inference_mode_enabled())
    return y


@register_method("test-noisy", blind=False, model="none", default_nfe=1)
def restore_test_noisy(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    """Pseudo-inverse plus per-image noise from ``generator``."""
    x = op.pinv(y) if op.linear else y
    return x + 0.1 * randn(x.shape, generator, device=x.device)


@register_method("test-bcm", blind=False, model="bcm", operators=("box", "down"), default_nfe=2)
def restore_test_bcm(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    """``nfe`` rounds of denoise-then-project with the network."""
    x = op.pinv(y)
    for _ in range(nfe):
        x = op.project(model(x, 0.5), y)
    return x


def run_cli(*args):
    return CliRunner().invoke(main, ["run", *map(str, args), "--no-progress"])


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def random_rgb(seed, h=16, w=16):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def manifest(out):
    with open(out / "manifest.csv", newline="") as f:
        return {row["image_id"]: row for row in csv.DictReader(f)}


@pytest.fixture
def inputs(tmp_path):
    """Five readable images of 16x16 (RGB, grey, RGBA, one in a sub-folder), a corrupt PNG and a text file."""
    src = tmp_path / "in"
    for k, name in enumerate(["a.png", "b.png", "c.jpg"]):
        save(src / name, random_rgb(k))
    save(src / "grey.png", np.random.default_rng(5).integers(0, 256, (16, 16), dtype=np.uint8), "L")
    save(src / "rgba.png", np.random.default_rng(6).integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA")
    save(src / "sub" / "d.png", random_rgb(7))
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / "notes.txt").write_text("hello")
    return src


def test_restores_every_image_and_reports_bad_files(inputs, tmp_path):
    out = tmp_path / "out"
    result = run_cli(inputs, out, "--operator", "jpeg:quality=50", "--method", "test-pinv", "--recursive",
                     "--batch-size", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["restored"], summary["skipped"], summary["failed"]) == (6, 0, 2)
    assert "skipping bad.png" in result.stderr and "skipping notes.txt" in result.stderr
    rows = manifest(out)
    assert {i for i, r in rows.items() if r["status"] == "error"} == {"bad.png", "notes.txt"}
    ok = {i: r for i, r in rows.items() if r["status"] == "ok"}
    assert set(ok) == {"a.png", "b.png", "c.jpg", "grey.png", "rgba.png", "sub/d.png"}
    for image_id, row in ok.items():
        # The identity keeps every input pixel (grey replicated, RGBA composited on white: restore.app.io's rule).
        assert torch.equal(read_image(out / row["output"]), read_image(inputs / image_id))
        assert row["output"] == image_id.rsplit(".", 1)[0] + ".png"
        assert int(row["nfe_forward"]) == 0 and float(row["seconds"]) >= 0 and row["tiles"] == "1"
        assert row["psnr"] == ""  # no reference: no PSNR; the input is y, so consistency is scored against it
        y = read_image(inputs / image_id)[None]
        expected = consistency_psnr(read_image(out / row["output"])[None], y, build_operator("jpeg:quality=50"))
        assert float(row["cpsnr"]) == pytest.approx(expected.item())
    assert not (out / "degraded").exists()


def test_resume_skip_overwrite_and_changed_settings(inputs, tmp_path):
    out = tmp_path / "out"
    args = [inputs, out, "--operator", "box:size=4", "--method", "test-pinv", "--batch-size", "2"]
    STATE["interrupt_after"], STATE["calls"] = 1, 0
    try:
        with pytest.raises(KeyboardInterrupt):
            run_folder(inputs, out, operator="box:size=4", method="test-pinv", batch_size=2)
    finally:
        STATE["interrupt_after"] = None
    assert [r["status"] for r in manifest(out).values()].count("ok") == 2  # the first batch survived

    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    assert (json.loads(first.stdout)["restored"], json.loads(first.stdout)["skipped"]) == (3, 2)
    times = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}

    again = run_cli(*args)
    assert (json.loads(again.stdout)["restored"], json.loads(again.stdout)["skipped"]) == (0, 5)
    (out / "b.png").unlink()
    redo = run_cli(*args)
    assert json.loads(redo.stdout)["restored"] == 1 and (out / "b.png").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in times.items() if p.name != "b.png")

    other = run_cli(*args, "--hparam", "scale=0.5")
    assert other.exit_code != 0 and "other settings" in other.output and "--overwrite" in other.output
    assert len(other.output.strip().splitlines()) == 1
    forced = run_cli(*args, "--hparam", "scale=0.5", "--overwrite")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["restored"] == 5
    assert read_image(out / "a.png").abs().max() <= 0.51


def test_degrade_is_seeded_per_image_not_per_batch(inputs, tmp_path):
    args = [inputs, "--operator", "down:factor=2,kernel=avg,noise=0.1", "--method", "test-noisy", "--degrade"]
    outs = []
    for name, batch, seed in [("b1", 1, 3), ("b4", 4, 3), ("s4", 4, 4)]:
        result = run_cli(args[0], tmp_path / name, *args[1:], "--batch-size", batch, "--seed", seed)
        assert result.exit_code == 0, result.output
        outs.append(tmp_path / name)
    b1, b4, s4 = outs
    rows1, rows4 = manifest(b1), manifest(b4)
    assert rows1["a.png"]["degraded"] == "degraded/a.png"
    assert Image.open(b1 / "degraded" / "a.png").size == (8, 8)
    for image_id, row in rows1.items():
        if row["status"] != "ok":
            continue
        for file in (row["output"], row["degraded"]):
            assert torch.equal(read_image(b1 / file), read_image(b4 / file))
        assert float(row["psnr"]) == float(rows4[image_id]["psnr"]) and math.isfinite(float(row["ssim"]))
        # psnr is against the clean input, on the saved 8-bit output
        ref = read_image(inputs / image_id)[None]
        assert float(row["psnr"]) == pytest.approx(psnr(read_image(b1 / row["output"])[None], ref).item())
    assert not torch.equal(read_image(b1 / "a.png"), read_image(s4 / "a.png"))  # another seed, other noise


def test_reference_folder_gives_metrics_by_image_id(tmp_path):
    src, refs = tmp_path / "jpegs", tmp_path / "clean"
    for k in range(3):
        save(refs / f"im{k}.png", random_rgb(k))
        Image.fromarray(random_rgb(k)).save(src.mkdir(exist_ok=True) or src / f"im{k}.jpg", quality=30)
    (refs / "im2.png").unlink()
    out = tmp_path / "out"
    result = run_cli(src, out, "--operator", "jpeg:quality=30", "--method", "test-pinv", "--reference", refs)
    assert result.exit_code == 0, result.output
    rows = manifest(out)
    for k in range(2):
        expected = psnr(read_image(src / f"im{k}.jpg")[None], read_image(refs / f"im{k}.png")[None]).item()
        assert float(rows[f"im{k}.jpg"]["psnr"]) == pytest.approx(expected)
        assert 0 < float(rows[f"im{k}.jpg"]["ssim"]) < 1
    assert rows["im2.jpg"]["psnr"] == "" and rows["im2.jpg"]["note"] == "no reference"
    assert "psnr" not in json.loads(result.stdout)["mean"]  # not every image has one


def test_other_sizes_are_tiled_exactly_for_a_local_method(tmp_path):
    src = tmp_path / "lr"
    save(src / "native.png", random_rgb(1, 8, 8))
    save(src / "wide.png", random_rgb(2, 13, 22))
    out = tmp_path / "out"
    summary = run_folder(src, out, operator="down:factor=2,kernel=avg", method="test-pinv", tile=16, batch_size=3)
    assert sorted(summary.restored) == ["native.png", "wide.png"]
    op = build_operator("down:factor=2,kernel=avg")
    rows = manifest(out)
    for name, tiles in [("native.png", 1), ("wide.png", 2 * 4)]:
        y = read_image(src / name)[None]
        assert torch.equal(read_image(out / name), read_image_of(op.pinv(y), tmp_path))
        assert int(rows[name]["tiles"]) == tiles


def read_image_of(x, tmp_path):
    """What an image looks like after saving it as PNG."""
    from restore.app.io import write_png

    return read_image(write_png(x, tmp_path / "tmp.png"))


@pytest.fixture(scope="module")
def tiny_bcm(tmp_path_factory):
    config = UNetConfig.preset("cifar-tiny", img_resolution=16, attention_resolutions=(8,), bidirectional=True)
    return save_model(BCM(UNet(config)), tmp_path_factory.mktemp("model") / "bcm.safetensors")


def test_network_sizes_tiles_nfe_and_the_box_size_error(tiny_bcm, tmp_path):
    src = tmp_path / "in"
    save(src / "native.png", random_rgb(1, 16, 16))
    save(src / "big.png", random_rgb(2, 20, 24))
    box = run_cli(src, tmp_path / "box", "--operator", "box:size=4", "--method", "test-bcm", "--model", tiny_bcm)
    assert box.exit_code != 0 and len(box.output.strip().splitlines()) == 1
    assert "16x16" in box.output and "big.png (20x24)" in box.output
    assert not (tmp_path / "box").exists()  # refused before writing anything

    out = tmp_path / "down"
    result = run_cli(src, out, "--operator", "down:factor=2,kernel=avg", "--method", "test-bcm", "--model", tiny_bcm,
                     "--degrade", "--nfe", "3", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    rows = manifest(out)
    assert (rows["native.png"]["tiles"], rows["native.png"]["nfe_forward"]) == ("1", "3")
    tiles = int(rows["big.png"]["tiles"])  # y is 10x12, tiles of 8 with overlap 2: 2 x 2
    assert tiles == 4 and int(rows["big.png"]["nfe_forward"]) == 3 * math.ceil(tiles / 2)
    assert Image.open(out / "big.png").size == (24, 20)
    assert float(rows["big.png"]["cpsnr"]) > 40  # projected onto y, so consistent up to 8-bit rounding


def test_user_errors_are_one_line(inputs, tiny_bcm, tmp_path):
    cases = [
        ([inputs, inputs, "--operator", "jpeg:quality=10", "--method", "test-pinv"], "is the input folder"),
        ([inputs, tmp_path / "o", "--operator", "jpeg:quality=10", "--method", "test-bcm"], "does not support"),
        ([inputs, tmp_path / "o", "--operator", "box:size=4", "--method", "test-bcm"], "needs a bcm model"),
        ([inputs, tmp_path / "o", "--operator", "box:size=4", "--method", "test-pinv", "--model", tiny_bcm],
         "drop --model"),
        ([inputs, tmp_path / "o", "--operator", "jpeg:q=1", "--method", "test-pinv"], "unknown parameter"),
        ([inputs, tmp_path / "o", "--operator", "jpeg:quality=10", "--method", "nope"], "unknown method"),
        ([inputs, tmp_path / "o", "--operator", "randbox:size=4", "--method", "test-pinv"], "needs --degrade"),
        ([inputs, tmp_path / "o", "--operator", "randmask:p=0.5", "--method", "test-pinv"], "needs --degrade"),
        ([inputs, tmp_path / "o", "--operator", "box:size=4", "--method", "test-pinv", "--hparam", "eta=1"],
         "no hyper-parameter eta; valid: scale"),
        ([inputs, tmp_path / "o", "--operator", "jpeg:quality=10", "--method", "test-pinv", "--tile", "32",
          "--overlap", "20"], "overlap must be in [0, 16]"),
        ([inputs, tmp_path / "o", "--operator", "box:size=4", "--method", "test-pinv", "--degrade", "--reference",
          inputs], "drop --reference"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()


def test_inference_mode_unless_the_method_needs_grad(inputs, tmp_path):
    STATE["inference_mode"].clear()
    run_folder(inputs, tmp_path / "a", operator="box:size=4", method="test-pinv")
    run_folder(inputs, tmp_path / "b", operator="box:size=4", method="test-grad")
    assert STATE["inference_mode"] == [True, False]


def test_methods_command_lists_registered_methods():
    listed = CliRunner().invoke(main, ["methods", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["test-bcm"] == {"name": "test-bcm", "blind": False, "operators": ["box", "down"], "model": "bcm",
                                "default_nfe": 2, "needs_grad": False, "space": {},
                                "description": "``nfe`` rounds of denoise-then-project with the network."}
    assert rows["test-pinv"]["operators"] == "any" and rows["test-pinv"]["model"] == "none"
    table = CliRunner().invoke(main, ["methods"])
    assert table.exit_code == 0 and "test-bcm" in table.output and "box,down" in table.output


def test_run_error_is_a_value_error_for_python_callers(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        run_folder(tmp_path / "missing", tmp_path / "out", operator="box:size=4", method="test-pinv")
