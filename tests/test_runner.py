"""Benchmark runner: long-format results, resume after a kill, partial invalidation, shards == one process,
counted NFE with a real (tiny) model, gradient methods outside inference mode, FID/KID per cell."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.runner import COLUMNS, read_journals, results_frame, run_suite
from benchmarks.suites import parse_suite
from operators.utils import randn
from restore.app.io import write_png
from restore.methods import register_method

CALLS: Counter = Counter()  # (method, nfe) -> images restored
KILL_AFTER: list[int] = []  # raise Killed once this many batches have run


class Killed(BaseException):
    """Stands in for kill -9: not an Exception, so nothing in the runner catches it."""


def _count(name, y, nfe):
    CALLS[name, nfe] += len(y)
    if KILL_AFTER:
        KILL_AFTER[0] -= 1
        if KILL_AFTER[0] < 0:
            KILL_AFTER.clear()
            raise Killed


@register_method("run-test-pinv", blind=False, model="none", default_nfe=0)
def _pinv(model, y, op, *, nfe, generator=None, callback=None, class_labels=None, shift=0.0):
    """Pseudo-inverse (JPEG: the decoded image), optionally shifted."""
    _count("run-test-pinv", y, nfe)
    return (op.pinv(y) if op.linear else y) + shift


@register_method("run-test-noisy", blind=False, model="none", default_nfe=0)
def _noisy(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    """Pseudo-inverse plus noise from the per-image generators (checks seeding across batches and shards)."""
    _count("run-test-noisy", y, nfe)
    x = op.pinv(y) if op.linear else y
    return x + 0.1 * (nfe + 1) * randn(x.shape, generator, device=x.device)


@register_method("run-test-grad", blind=False, model="none", default_nfe=0, needs_grad=True)
def _grad(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    """One gradient step on ||A x - y||^2 from x = 0: fails inside inference_mode."""
    x = torch.zeros_like(op.pinv(y) if op.linear else y, requires_grad=True)
    (g,) = torch.autograd.grad((op(x) - y).square().sum(), x)
    return (x - 0.5 * g).detach()


@register_method("run-test-bcm", blind=True, model="bcm", default_nfe=1)
def _bcm(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    """nfe jumps of a BCM, from sigma 1 down (enough to count network evaluations)."""
    x = op.pinv(y) if op.linear else y
    for _ in range(nfe):
        x = model.jump(x + randn(x.shape, generator, device=x.device), 1.0, model.sigma_min)
    return x


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six smooth random 32x32 RGB images in a folder (ids im0.png ... im5.png)."""
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    low = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(low, size=32, mode="bicubic").clamp(-1, 1)
    for i in range(6):
        write_png(x[i], folder / f"im{i}.png")
    return folder


def make_suite(folder, **changes):
    data = {
        "dataset": str(folder), "images": 4, "batch_size": 2, "metrics": ["psnr", "cpsnr"],
        "operators": ["jpeg:quality=10", "randbox:size=8,noise=0.05"],
        "methods": [{"name": "run-test-pinv", "nfe": [0]}, {"name": "run-test-noisy", "nfe": [0, 1]}],
        **changes,
    }
    return parse_suite(data, "t")


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    KILL_AFTER.clear()


def values(frame: pd.DataFrame) -> pd.Series:
    return frame.set_index(["operator", "method", "nfe_budget", "seed", "image_id", "metric"]).value.sort_index()


def test_end_to_end_long_table(images, tmp_path):
    summary = run_suite(make_suite(images), tmp_path / "out", progress=False)
    frame = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(frame.columns[:len(COLUMNS)]) == COLUMNS
    assert summary["cells"] == 6 and summary["failures"] == [] and len(frame) == 6 * 4 * 2
    assert set(frame.image_id) == {f"im{i}.png" for i in range(4)} and set(frame.dataset) == {images.name}
    assert frame.value.map(math.isfinite).all() and (frame.nfe == 0).all() and (frame.seconds >= 0).all()
    # anchor: the pseudo-inverse reproduces y up to 8-bit rounding and clipping; noise alone would give 32 dB
    pinv = frame[(frame.method == "run-test-pinv") & (frame.metric == "cpsnr")]
    assert (pinv[pinv.operator.str.startswith("randbox")].value > 40).all()
    assert CALLS == {("run-test-pinv", 0): 8, ("run-test-noisy", 0): 8, ("run-test-noisy", 1): 8}
    meta = json.loads((tmp_path / "out" / "run.json").read_text())
    assert meta["environment"]["versions"]["torch"] == torch.__version__ and "commit" in meta["environment"]["git"]
    assert len(meta["cells"]) == 6 and meta["suite"]["operators"] == ["jpeg:quality=10", "randbox:size=8,noise=0.05"]
    for cell in meta["cells"]:
        assert len(list((tmp_path / "out" / cell["dir"]).glob("*.png"))) == 4


def test_a_stopped_run_reads_as_its_cells_so_far(images, tmp_path):
    from benchmarks.report import write_report
    from benchmarks.tables import load_results

    out = tmp_path / "out"
    run_suite(make_suite(images, operators=["jpeg:quality=10"]), out, progress=False)  # finished: results.csv
    first = load_results(out)
    assert json.loads((out / "run.json").read_text())["finished"] is True
    grown = make_suite(images, operators=["jpeg:quality=10"],
                       methods=[{"name": "run-test-pinv", "nfe": [0]}, {"name": "run-test-noisy", "nfe": [1, 2]}])
    KILL_AFTER.append(1)  # the new 2-NFE cell dies in its second batch: results.csv is stale from here on
    with pytest.raises(Killed):
        run_suite(grown, out, progress=False)
    assert json.loads((out / "run.json").read_text())["finished"] is False
    frame = load_results(out)
    cells = frame.groupby(["method", "nfe_budget"]).image_id.nunique().to_dict()
    assert cells == {("run-test-pinv", 0): 4, ("run-test-noisy", 1): 4, ("run-test-noisy", 2): 2}  # not NFE 0
    assert ("run-test-noisy", 0) in set(zip(first.method, first.nfe_budget))
    report, _ = write_report(out)
    assert "in progress or stopped" in report.read_text() and "run-test-noisy" in report.read_text()


def test_resume_after_kill_recomputes_nothing_finished(images, tmp_path):
    suite, out = make_suite(images), tmp_path / "out"
    KILL_AFTER.append(5)  # dies inside the 6th of 12 batches
    with pytest.raises(Killed):
        run_suite(suite, out, progress=False)
    with open(out / "records" / "rank0.jsonl", "a") as f:
        f.write('{"kind": "row", "unit": "torn", "value": 1')  # a write cut short by the kill
    first = sum(CALLS.values())
    assert first == 12  # five finished batches of two, plus the killed one
    CALLS.clear()
    run_suite(suite, out, progress=False)
    assert sum(CALLS.values()) == 24 - 10  # only the unfinished batches ran again
    CALLS.clear()
    run_suite(suite, out, progress=False)
    assert sum(CALLS.values()) == 0
    clean = tmp_path / "clean"
    run_suite(suite, clean, progress=False)
    pd.testing.assert_series_equal(values(results_frame(out)), values(results_frame(clean)))


def test_changed_suite_recomputes_only_changed_cells(images, tmp_path):
    out = tmp_path / "out"
    run_suite(make_suite(images), out, progress=False)
    CALLS.clear()
    changed = make_suite(images, images=5, metrics=["psnr", "cpsnr", "ssim"], methods=[
        {"name": "run-test-pinv", "nfe": [0], "hparams": {"shift": 0.01}}, {"name": "run-test-noisy", "nfe": [0, 1]}])
    run_suite(changed, out, progress=False)
    # pinv changed: all 5 images x 2 operators again; noisy: only the new fifth image
    assert CALLS == {("run-test-pinv", 0): 10, ("run-test-noisy", 0): 2, ("run-test-noisy", 1): 2}
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 6 * 5 * 3 and set(frame.metric) == {"psnr", "cpsnr", "ssim"}
    # SSIM of the old images came from the saved PNGs; equal to a fresh run's
    fresh = tmp_path / "fresh"
    run_suite(changed, fresh, progress=False)
    pd.testing.assert_series_equal(values(frame), values(pd.read_csv(fresh / "results.csv")))


def test_shards_merge_to_the_single_process_table(images, tmp_path):
    suite = make_suite(images, images=5)
    run_suite(suite, tmp_path / "one", progress=False)
    sharded = make_suite(images, images=5, batch_size=3)  # batch size is not part of the results either
    for rank in (1, 0):  # rank 0 merges, after the other shard has finished
        run_suite(sharded, tmp_path / "two", progress=False, shard=(rank, 2))
    assert sorted(p.name for p in (tmp_path / "two" / "records").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    one, two = pd.read_csv(tmp_path / "one" / "results.csv"), pd.read_csv(tmp_path / "two" / "results.csv")
    assert len(one) == len(two) == 6 * 5 * 2
    pd.testing.assert_series_equal(values(one), values(two))


def test_gradient_methods_run_outside_inference_mode(images, tmp_path):
    suite = make_suite(images, operators=["box:size=8"], methods=[{"name": "run-test-grad", "nfe": [0]}])
    summary = run_suite(suite, tmp_path / "out", progress=False)
    assert summary["failures"] == []
    frame = pd.read_csv(tmp_path / "out" / "results.csv")
    assert (frame[frame.metric == "cpsnr"].value > 40).all()  # one step of size 1/2 on the mask: x = y


def test_counted_nfe_and_parameters_with_a_model(images, tmp_path):
    from restore.engine.checkpoints import save_model
    from restore.engine.networks import UNet, UNetConfig
    from restore.engine.wrappers import BCM, EDMDenoiser

    torch.manual_seed(0)
    bcm = BCM(UNet(UNetConfig.preset("cifar-tiny", bidirectional=True)))
    save_model(bcm, tmp_path / "bcm.safetensors")
    save_model(EDMDenoiser(UNet(UNetConfig.preset("cifar-tiny"))), tmp_path / "edm.safetensors")
    suite = make_suite(images, images=2, operators=["jpeg:quality=10"], models={"m": str(tmp_path / "bcm.safetensors")},
                       methods=[{"name": "run-test-bcm", "model": "m", "nfe": [1, 2]}])
    run_suite(suite, tmp_path / "out", progress=False)
    frame = pd.read_csv(tmp_path / "out" / "results.csv")
    assert sorted(set(zip(frame.nfe_budget, frame.nfe))) == [(1, 1), (2, 2)]
    assert set(frame.params) == {sum(p.numel() for p in bcm.parameters())}
    models = json.loads((tmp_path / "out" / "run.json").read_text())["models"]  # the fairness record
    assert [m["params"] for m in models["models"]] == list(frame.params[:1])
    assert models["violations"] == [f"{tmp_path / 'bcm.safetensors'}: no model card with a training recipe and "
                                    "budget, so its training is unknown"]
    assert models["models"][0]["train GFLOP"] is None and models["compute_not_recorded"] == [models["reference"]]
    with pytest.raises(ValueError, match="needs a 'bcm' model but .* is a 'edm' model"):
        run_suite(suite.with_models({"m": str(tmp_path / "edm.safetensors")}), tmp_path / "bad", progress=False)


def test_fid_and_kid_per_cell(images, tmp_path, monkeypatch):
    monkeypatch.setenv("BCM_RESTORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # Inception weights converted here, offline
    suite = make_suite(images, images=3, operators=["jpeg:quality=10"], metrics=["psnr", "fid", "kid"],
                       methods=[{"name": "run-test-pinv", "nfe": [0]}])
    run_suite(suite, tmp_path / "out", progress=False)
    frame = pd.read_csv(tmp_path / "out" / "results.csv")
    fid = frame[frame.metric.isin(["fid", "kid"])]
    assert list(fid.image_id) == ["*", "*"] and fid.value.map(math.isfinite).all() and (fid.value.iloc[:1] > 0).all()
    assert list((tmp_path / "cache" / "fid").glob("*.npz"))  # reference features cached
    done = read_journals(tmp_path / "out")[1]
    run_suite(suite, tmp_path / "out", progress=False)  # nothing left to do, FID included
    assert len(read_journals(tmp_path / "out")[1]) == len(done)
    run_suite(suite, tmp_path / "out", progress=False, limit=2)  # another image set: FID again, no restoration
    assert CALLS == {("run-test-pinv", 0): 3}
    frame = pd.read_csv(tmp_path / "out" / "results.csv")
    assert sorted(frame.image_id.unique()) == ["*", "im0.png", "im1.png"]
    assert (frame[frame.metric == "fid"].n == 2).all()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(images, tmp_path):
    """The real thing: torchrun --nproc_per_node=2 on CPU (gloo) writes the table one process writes."""
    suite_file = tmp_path / "s.toml"
    suite_file.write_text(f'dataset = "{images}"\nimages = 5\nbatch_size = 2\nmetrics = ["psnr", "cpsnr"]\n'
                          'operators = ["jpeg:quality=10", "randbox:size=8,noise=0.05"]\n'
                          '[[methods]]\nname = "run-test-noisy"\nnfe = [0, 1]\n')
    script = tmp_path / "bench.py"  # registers the test methods in every process, then runs the CLI
    script.write_text(f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "import test_runner\nfrom benchmarks.cli import main\nmain(prog_name='restore-bench')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for procs, out in ((2, "two"), (1, "one")):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", str(script), "run",
               str(suite_file), "--out", str(tmp_path / out), "--no-progress", "--device", "cpu"]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "two" / "records").glob("*.jsonl"))) == 2
    one, two = pd.read_csv(tmp_path / "one" / "results.csv"), pd.read_csv(tmp_path / "two" / "results.csv")
    assert len(two) == 2 * 2 * 5 * 2
    pd.testing.assert_series_equal(values(one), values(two))
    assert np.isfinite(two.value).all()


def test_one_writer_per_journal(tmp_path):
    from benchmarks.runner import Journal

    first = Journal(tmp_path / "records" / "rank0.jsonl")
    with pytest.raises(OSError, match="another run is writing"):
        Journal(tmp_path / "records" / "rank0.jsonl")
    first.close()
    Journal(tmp_path / "records" / "rank0.jsonl").close()


@pytest.mark.parametrize("content, kept", [(b"a\nb\nc", b"a\nb\n"), (b"abc", b""), (b"a\n", b"a\n"),
                                           (b"x\n" + b"y" * (2 << 20), b"x\n")])  # torn line longer than the 1 MiB tail
def test_torn_journal_tail_is_cut(tmp_path, content, kept):
    from benchmarks.runner import repair_tail

    (tmp_path / "j.jsonl").write_bytes(content)
    repair_tail(tmp_path / "j.jsonl")
    assert (tmp_path / "j.jsonl").read_bytes() == kept


def test_cached_measurements_come_back_with_the_operator_that_made_them(images, tmp_path):
    """The measure stage draws randbox's boxes from the generators also when y is read from the cache, so the
    cached y and the boxes a method restores with always belong together; the operator family stays untouched."""
    from benchmarks.runner.execute import batch_generators
    from benchmarks.runner.measure import MeasurementCache
    from operators import build_operator
    from restore.app.io import read_image

    ids = ["im0.png", "im1.png", "im2.png"]
    x = torch.stack([read_image(images / i) for i in ids])
    cache = MeasurementCache(tmp_path, "d", frozenset(ids[:1]))
    family = build_operator("randbox:size=8,noise=0.05")
    made = cache.measure(family, family.spec, 3, ids, x, batch_generators(3, ids, torch.device("cpu")).measure)
    assert len(list(cache.folder(family.spec, 3).glob("*.npy"))) == 3 and (tmp_path / "reference" / "im0.png").is_file()
    read = cache.measure(family, family.spec, 3, ids, x, batch_generators(3, ids, torch.device("cpu")).measure)
    assert torch.equal(made.y, read.y) and torch.equal(made.op.boxes, read.op.boxes)
    assert family.boxes is None and made.op.spec == family.spec
    torch.testing.assert_close(made.op(made.y), made.y, rtol=0, atol=0)  # y is zero in the hole of its own boxes


def test_a_packed_run_continues_on_another_machine(images, tmp_path, monkeypatch):
    """A killed run keeps each finished cell's FID (scored when the cell ends); its archive drops the restorations
    finished cells no longer need, and an unpacked copy finishes with the values of an uninterrupted run."""
    import tarfile

    from benchmarks.runner.pack import pack_run, unpack_run

    monkeypatch.setenv("BCM_RESTORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr("benchmarks.runner.plan.GRID_IMAGES", 1)
    suite = make_suite(images, operators=["jpeg:quality=10"], metrics=["psnr", "fid"],
                       methods=[{"name": "run-test-pinv", "nfe": [0]}, {"name": "run-test-noisy", "nfe": [0, 1]}])
    KILL_AFTER.append(5)  # two cells of two batches, then one batch of the third
    with pytest.raises(Killed):
        run_suite(suite, tmp_path / "a", progress=False)
    done = read_journals(tmp_path / "a")[1]
    assert sum(bool(d.get("set_key")) for d in done) == 2  # the finished cells are scored already

    packed = pack_run(tmp_path / "a", tmp_path / "a.tar.gz")
    assert packed["cells_scored"] == 2 and packed["cells_unscored"] == 1
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        outputs = sorted(Path(n).name for n in tar.getnames() if n.startswith("outputs/"))
        assert not [n for n in tar.getnames() if n.endswith(".npy")]
    assert outputs == ["im0.png", "im0.png", "im0.png", "im1.png"]  # the grid image, and the unscored cell's work

    unpack_run(tmp_path / "a.tar.gz", tmp_path / "b")
    CALLS.clear()
    run_suite(suite, tmp_path / "b", progress=False)
    assert CALLS == {("run-test-noisy", 1): 2}  # only what the killed run had not restored
    run_suite(suite, tmp_path / "c", progress=False)
    pd.testing.assert_series_equal(values(pd.read_csv(tmp_path / "b" / "results.csv")),
                                   values(pd.read_csv(tmp_path / "c" / "results.csv")))
    with pytest.raises(ValueError, match="already holds results"):
        unpack_run(tmp_path / "a.tar.gz", tmp_path / "b")
    finished = pack_run(tmp_path / "b", tmp_path / "b.tar.gz")  # with run.json: every cell scored, grid PNGs only
    assert finished["cells_unscored"] == 0 and finished["cells_scored"] == 3
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        assert sorted(Path(n).name for n in tar.getnames() if n.startswith("outputs/")) == ["im0.png"] * 3
