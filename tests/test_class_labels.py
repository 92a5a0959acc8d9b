"""Class labels from datasets to every model call: the method contract with a tiny class-conditional UNet,
clear errors for missing or unwanted labels, dataset readers, `restore run --class-labels`, the runner and
generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import restore.engine.checkpoints
from benchmarks.generation import generate, sample_class_labels
from benchmarks.runner import run_suite
from benchmarks.suites import parse_suite
from operators import build_operator
from operators.utils import make_generators, randn, to_uint8
from restore.app.cli import main as restore_main
from restore.app.io import ImageFolder, read_image, write_png
from restore.datasets import build_dataset, imagenet_class_index, imagenet_wnids, load_npz
from restore.engine.checkpoints import save_model
from restore.engine.networks import UNet, UNetConfig
from restore.engine.sampling import sample_bcm
from restore.engine.wrappers import class_conditioning, get_wrapper
from restore.methods import get_method, list_methods, register_method

RES = 16
CLASSES = 10
# A 16x16-friendly operator per method family, and a small budget (bdia-restore: one inversion step).
SPECS = ("jpeg:quality=10", "box:size=4", "down:factor=2,kernel=avg")
NFE = {"bdia-restore": 3}


def tiny_net(num_classes: int = CLASSES, seed: int = 0, **overrides) -> UNet:
    """cifar-tiny at 16x16 with every parameter random: the zero-initialised output convolutions of a fresh UNet
    would hide the network, labels included."""
    net = UNet(UNetConfig.preset("cifar-tiny", img_resolution=RES, attention_resolutions=(8,),
                                 num_classes=num_classes, **overrides))
    n = sum(p.numel() for p in net.parameters())
    torch.nn.utils.vector_to_parameters(torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.05,
                                        net.parameters())
    return net.eval()


def tiny_model(kind: str, spec: str, num_classes: int = CLASSES):
    """A weight-free model of wrapper ``kind`` (conditional baselines trained for ``spec``)."""
    cls = get_wrapper(kind)
    if kind == "bcm":
        return cls(tiny_net(num_classes, bidirectional=True))
    if kind == "palette":
        return cls(tiny_net(num_classes, cond_channels=3), operator=spec)
    if kind == "i2sb":
        return cls(tiny_net(num_classes), operator=spec)
    return cls(tiny_net(num_classes))


def builtin(entry: dict) -> bool:
    """A method of the toolkit or the baselines (not one a test module registered)."""
    return get_method(entry["name"]).fn.__module__.startswith(("restore.", "baselines."))


def network_methods() -> list[tuple[str, str]]:
    """(method, operator spec) for every built-in method that calls a network."""
    out = []
    for entry in filter(builtin, list_methods()):
        if entry["model"] != "none":
            method = get_method(entry["name"])
            out.append((entry["name"], next(s for s in SPECS if method.supports(build_operator(s)))))
    return out


def measurement(spec: str, n: int = 2):
    op = build_operator(spec)
    x = torch.rand(n, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return op, op.measure(x)


def run_method(name: str, model, op, y, labels):
    method = get_method(name)
    grad = torch.enable_grad() if method.needs_grad else torch.inference_mode()
    with grad:
        return method(model, y, op, nfe=NFE.get(name, 2), generator=make_generators(0, range(len(y))),
                      class_labels=labels).detach()


@pytest.mark.parametrize("name,spec", network_methods())
def test_every_network_method_conditions_on_the_labels(name, spec, single_thread):
    model = tiny_model(get_method(name).model, spec)
    op, y = measurement(spec)
    with model.counter.counting() as tally:
        a = run_method(name, model, op, y, torch.tensor([0, 1]))
    assert tally.forward > 0 and torch.isfinite(a).all()
    assert torch.equal(a, run_method(name, model, op, y, [0, 1]))  # deterministic given generators and labels
    b = run_method(name, model, op, y, torch.tensor([7, 4]))
    assert not torch.allclose(a, b), f"{name}: the output ignores the class labels"
    c = run_method(name, model, op, y, 3)  # one int: the same class for every image
    assert torch.equal(c, run_method(name, model, op, y, [3, 3]))


@pytest.mark.parametrize("name,spec", network_methods())
def test_missing_or_unwanted_labels_are_one_line_errors(name, spec):
    op, y = measurement(spec)
    with pytest.raises(ValueError, match=r"class-conditional \(10 classes\).*pass class_labels"):
        run_method(name, tiny_model(get_method(name).model, spec), op, y, None)
    with pytest.raises(ValueError, match="unconditional.*drop the labels"):
        run_method(name, tiny_model(get_method(name).model, spec, num_classes=0), op, y, [0, 1])


def test_network_free_methods_accept_and_ignore_labels():
    for entry in filter(builtin, list_methods()):
        if entry["model"] == "none":
            op, y = measurement(next(s for s in SPECS if get_method(entry["name"]).supports(build_operator(s))))
            assert torch.equal(get_method(entry["name"])(None, y, op, class_labels=[1, 2]),
                               get_method(entry["name"])(None, y, op))


def test_class_conditioning_checks_shape_and_range():
    model = tiny_model("edm", SPECS[0])
    assert class_conditioning(model, 4, 3)["class_labels"].tolist() == [4, 4, 4]
    assert class_conditioning(tiny_model("edm", SPECS[0], num_classes=0), None, 3) == {}
    with pytest.raises(ValueError, match="one int or 3 ints"):
        class_conditioning(model, [1, 2], 3)
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        class_conditioning(model, [1, 10, 2], 3)


# --------------------------------------------------------------------------- datasets


def test_cifar10_labels(npz_cifar_test):
    ds = load_npz(npz_cifar_test, name="cifar10-test")
    with np.load(npz_cifar_test, allow_pickle=False) as f:
        y = f["y"][:5]
    labels = ds.batch_labels([0, 1, 2, 3, 4])
    assert labels.dtype == torch.int64 and labels.tolist() == y.tolist() and ds.classes[labels[0]] == "cat"


@pytest.fixture(scope="module")
def npz_cifar_test() -> Path:
    from conftest import shared_file

    return shared_file("cifar10_test.npz")


def test_imagenet_wnids_are_the_sorted_ilsvrc2012_classes():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(set(wnids))
    # indices every ImageNet classifier and class-conditional checkpoint agrees on
    assert {i: wnids[i] for i in (0, 1, 207, 281, 999)} == {0: "n01440764", 1: "n01443537", 207: "n02099601",
                                                           281: "n02123045", 999: "n15075141"}
    assert imagenet_class_index(["n02123045", "n01443537"]).tolist() == [281, 1]
    with pytest.raises(ValueError, match="not ImageNet-1k classes: n99999999"):
        imagenet_class_index(["n01440764", "n99999999"])


def test_tinyimagenet_labels_are_imagenet1k_indices():
    from conftest import shared_file

    path = shared_file("tinyimagenet200_val_jpeg.npz")
    ds = load_npz(path, name="tinyimagenet-val")
    with np.load(path, allow_pickle=False) as f:
        y, wnids = f["y"].astype(np.int64), [str(w) for w in f["wnids"]]
    assert all(w in imagenet_wnids() for w in wnids)  # Tiny-ImageNet's 200 classes are ImageNet-1k classes
    labels = ds.labels
    assert [ds.classes[k] for k in labels[:50]] == [wnids[k] for k in y[:50]]  # label names its own wnid
    assert [imagenet_wnids().index(wnids[k]) for k in y[:50]] == labels[:50].tolist()
    goldfish = wnids.index("n01443537")  # ImageNet-1k class 1
    assert set(labels[y == goldfish].tolist()) == {1}


def test_downsampled_imagenet_labels(tmp_path, caplog):
    data = np.random.default_rng(0).integers(0, 256, (3, 3 * 8 * 8), dtype=np.uint8)
    np.savez(tmp_path / "val_data.npz", data=data, labels=np.array([1, 1000, 5]))
    ds = build_dataset(tmp_path / "val_data.npz")  # 1-based devkit numbers -> 0-based, with a warning
    assert ds.batch_labels([0, 1, 2]).tolist() == [0, 999, 4] and ds.image_id(0) == "imagenet8-val_data-00000"
    assert ds.classes is None and "not ImageNet-1k (sorted wnid) indices" in caplog.text
    # the devkit's map: 1 = kit fox, 5 = goldfish, 1000 = toilet tissue (ImageNet-1k 278, 1, 999)
    (tmp_path / "map_clsloc.txt").write_text("n02119789 1 kit_fox\nn01443537 5 goldfish\n"
                                             "n15075141 1000 toilet_tissue\n")
    ds = build_dataset(tmp_path / "val_data.npz")
    assert ds.batch_labels([0, 1, 2]).tolist() == [278, 999, 1] and ds.classes[278] == "n02119789"
    (tmp_path / "map_clsloc.txt").write_text("n02119789 1 kit_fox\n")
    with pytest.raises(ValueError, match="has no class 5"):
        build_dataset(tmp_path / "val_data.npz")


def image_folder(folder: Path, sizes=(RES, RES, RES), labels: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(2)
    for i, side in enumerate(sizes):
        write_png(torch.rand(3, side, side, generator=g) * 2 - 1, folder / f"im{i}.png")
    if labels is not None:
        lines = ["file,label", *(f"{k},{v}" for k, v in labels.items())]
        (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_folder_labels_csv(tmp_path):
    folder = image_folder(tmp_path / "f", labels={"im2.png": 9, "im0.png": 3, "im1.png": 0})
    reported = []
    assert ImageFolder(folder, on_error=lambda i, r: reported.append(i)).labels == {"im0.png": 3, "im1.png": 0,
                                                                                   "im2.png": 9}
    assert reported == []  # labels.csv is the folder's metadata, not a skipped file
    ds = build_dataset(folder)
    assert ds.labels.tolist() == [3, 0, 9] and ds.batch_labels([2, 0]).tolist() == [9, 3]
    (folder / "labels.csv").write_text("file,label\nim0.png,3\n")
    with pytest.raises(ValueError, match=r"no label for 2 image\(s\), e.g. im1.png"):
        build_dataset(folder)
    (folder / "labels.csv").write_text("file,label\nim0.png,cat\n")
    with pytest.raises(ValueError, match=r"labels.csv:2: label must be a non-negative integer"):
        build_dataset(folder)
    (folder / "labels.csv").unlink()
    with pytest.raises(ValueError, match="has no class labels"):
        build_dataset(folder).batch_labels([0])


# --------------------------------------------------------------------------- restore run


@pytest.fixture(scope="module")
def cond_bcm(tmp_path_factory) -> Path:
    return save_model(tiny_model("bcm", SPECS[0]), tmp_path_factory.mktemp("m") / "cond-bcm.safetensors")


def run_cli(src, dst, model, *extra):
    return CliRunner().invoke(restore_main, ["run", str(src), str(dst), "--operator", "jpeg:quality=10", "--method",
                                             "bcm-jpeg", "--model", str(model), "--nfe", "2", "--no-progress", *extra])


def test_restore_run_class_labels(tmp_path, cond_bcm, single_thread):
    labels = {"im0.png": 1, "im1.png": 2, "im2.png": 3}
    src = image_folder(tmp_path / "in", sizes=(RES, RES, 2 * RES), labels=labels)  # im2 is restored in tiles
    result = run_cli(src, tmp_path / "csv", cond_bcm, "--class-labels", src / "labels.csv")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "csv" / "run.json").read_text())["settings"]
    assert settings["class_labels"]["file"] == str((src / "labels.csv").resolve())
    assert len(settings["class_labels"]["sha256"]) == 64
    manifest = pd.read_csv(tmp_path / "csv" / "manifest.csv")
    assert (manifest.status == "ok").all() and manifest.set_index("image_id").tiles["im2.png"] > 1
    result = run_cli(src, tmp_path / "int", cond_bcm, "--class-labels", "1")
    assert result.exit_code == 0, result.output
    same = {i: torch.equal(read_image(tmp_path / "csv" / i), read_image(tmp_path / "int" / i)) for i in labels}
    assert same == {"im0.png": True, "im1.png": False, "im2.png": False}  # only im0 has class 1 in the file
    (src / "labels.csv").write_text("file,label\nim0.png,1\nim1.png,2\nim2.png,4\n")  # edited: not the same run
    result = run_cli(src, tmp_path / "csv", cond_bcm, "--class-labels", src / "labels.csv")
    assert result.exit_code != 0 and "other settings" in result.output

    result = run_cli(src, tmp_path / "none", cond_bcm)
    assert result.exit_code != 0 and "class-conditional (10 classes)" in result.output
    (tmp_path / "short.csv").write_text("file,label\nim0.png,1\n")
    result = run_cli(src, tmp_path / "short", cond_bcm, "--class-labels", tmp_path / "short.csv")
    assert result.exit_code != 0 and "has no label for 2 image(s)" in result.output
    result = run_cli(src, tmp_path / "range", cond_bcm, "--class-labels", "10")
    assert result.exit_code != 0 and "[0, 10)" in result.output
    uncond = save_model(tiny_model("bcm", SPECS[0], num_classes=0), tmp_path / "uncond.safetensors")
    result = run_cli(src, tmp_path / "unc", uncond, "--class-labels", "1")
    assert result.exit_code != 0 and "unconditional" in result.output


# --------------------------------------------------------------------------- runner


SEEN: list[int | None] = []  # the label of every image labels-spy restored, in call order


@register_method("labels-spy", blind=True, model="bcm", default_nfe=1)
def _spy(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    """Records the labels each image arrives with, then makes one conditioned jump."""
    cond = class_conditioning(model, class_labels, len(y), y.device)
    SEEN.extend(cond["class_labels"].tolist() if cond else [None] * len(y))
    return model.jump(y + randn(y.shape, generator, device=y.device), 1.0, model.sigma_min, **cond)


def suite(folder, model, **changes):
    return parse_suite({"dataset": str(folder), "images": 3, "batch_size": 2, "metrics": ["psnr"],
                        "operators": ["jpeg:quality=10"], "models": {"m": str(model)},
                        "methods": [{"name": "labels-spy", "model": "m", "nfe": [1]}, {"name": "pinv", "nfe": [0]}],
                        **changes}, "labels")


def test_runner_passes_dataset_labels_to_conditional_models(tmp_path, cond_bcm, npz_cifar_test, single_thread):
    folder = image_folder(tmp_path / "data", labels={"im0.png": 4, "im1.png": 8, "im2.png": 1})
    SEEN.clear()
    summary = run_suite(suite(folder, cond_bcm), tmp_path / "out", progress=False)
    assert summary["failures"] == [] and SEEN == [4, 8, 1]  # batches of 2 then 1, in id order
    cells = json.loads((tmp_path / "out" / "run.json").read_text())["cells"]
    assert {c["method"]: c["class_labels"] for c in cells} == {"labels-spy": True, "pinv": False}
    SEEN.clear()
    run_suite(suite(folder, cond_bcm, class_labels=True), tmp_path / "required", progress=False)
    assert SEEN == [4, 8, 1]

    uncond = save_model(tiny_model("bcm", SPECS[0], num_classes=0), tmp_path / "uncond.safetensors")
    SEEN.clear()
    run_suite(suite(folder, uncond), tmp_path / "unc", progress=False)  # default: no labels for it
    assert SEEN == [None, None, None]
    with pytest.raises(ValueError, match="class_labels = true but .* is unconditional"):
        run_suite(suite(folder, uncond, class_labels=True), tmp_path / "bad1", progress=False)
    with pytest.raises(ValueError, match=r"class_labels = false but .* is class-conditional \(10 classes\)"):
        run_suite(suite(folder, cond_bcm, class_labels=False), tmp_path / "bad2", progress=False)
    (folder / "labels.csv").unlink()
    with pytest.raises(ValueError, match="is class-conditional but dataset 'data' has no class labels"):
        run_suite(suite(folder, cond_bcm), tmp_path / "bad3", progress=False)
    imagenet = save_model(tiny_model("bcm", SPECS[0], num_classes=1000), tmp_path / "in.safetensors")
    with pytest.raises(ValueError, match="has 1000 classes but the labels of dataset 'cifar10-test' number 10"):
        run_suite(suite(npz_cifar_test, imagenet), tmp_path / "bad4", progress=False)


# --------------------------------------------------------------------------- generation


def test_generation_draws_seeded_uniform_labels(single_thread):
    model = tiny_model("bcm", SPECS[0])
    labels = sample_class_labels(model, 200, seed=3)
    assert labels.dtype == torch.int64 and labels.shape == (200,) and labels.min() >= 0 and labels.max() < CLASSES
    assert len(set(labels.tolist())) == CLASSES  # every class turns up among 200 uniform draws
    assert torch.equal(sample_class_labels(model, 5, seed=3), labels[:5])  # sample k's class depends on (seed, k)
    assert not torch.equal(sample_class_labels(model, 200, seed=4), labels)
    assert sample_class_labels(tiny_model("bcm", SPECS[0], num_classes=0), 5) is None

    x, counted = generate(model, 3, 1, seed=3, batch_size=2, image_shape=(3, RES, RES))
    assert counted == 1 and torch.equal(x, generate(model, 3, 1, seed=3, batch_size=3,
                                                    image_shape=(3, RES, RES))[0])
    gens = make_generators(3, range(3))
    x_T = model.sigma_max * randn((3, 3, RES, RES), gens)
    with torch.inference_mode():
        expected = sample_bcm(model, x_T, 1, generator=gens, extra_args={"class_labels": labels[:3]})
        other = sample_bcm(model, x_T, 1, generator=gens, extra_args={"class_labels": (labels[:3] + 1) % CLASSES})
    assert torch.equal(x, to_uint8(expected)) and not torch.equal(x, to_uint8(other))


def test_generation_command_records_the_labels(tmp_path, monkeypatch, single_thread):
    """A class-conditional model through `restore-bench generation`: class_labels.csv holds the drawn classes and
    the inverted CIFAR-10 images go in under their own labels (FID stubbed: the labels are the subject here)."""
    from conftest import shared_file

    import benchmarks.fid
    from benchmarks.cli import main as bench_main

    monkeypatch.setenv("BCM_RESTORE_DATA", str(shared_file("cifar10_test.npz").parent))
    monkeypatch.setattr(benchmarks.fid, "compute_fid_kid", lambda *a, **k: {"fid": 1.0, "kid": 0.0})
    seen = []
    model = get_wrapper("bcm")(UNet(UNetConfig.preset("cifar-tiny", bidirectional=True, num_classes=CLASSES)))
    forward = model.net.forward
    monkeypatch.setattr(model.net, "forward", lambda *a, **k: (seen.append(k["class_labels"].tolist()),
                                                                forward(*a, **k))[1])
    path = save_model(model, tmp_path / "cond.safetensors")
    # the command loads this very object, so the spy on its network sees every call's labels
    monkeypatch.setattr(restore.engine.checkpoints, "load_model", lambda ref, **k: model)
    result = CliRunner().invoke(bench_main, ["generation", str(path), "--out", str(tmp_path / "out"), "--n", "4",
                                             "--nfe", "1", "--inversion-nfe", "1", "--reference-split", "test",
                                             "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    drawn = pd.read_csv(tmp_path / "out" / "class_labels.csv")
    assert drawn["sample"].tolist() == [0, 1, 2, 3] and drawn.label.tolist() == sample_class_labels(model, 4).tolist()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_classes"] == CLASSES and summary["class_labels"] == "class_labels.csv"
    with np.load(shared_file("cifar10_test.npz"), allow_pickle=False) as f:
        truth = f["y"][:4].tolist()
    assert seen[0] == drawn.label.tolist() and seen[1:] == [truth, truth]  # generation, inversion up and down
