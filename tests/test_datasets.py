"""restore.datasets: real CIFAR-10 / Tiny-ImageNet facts, stable ids, on-disk formats, safe pickles."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from conftest import shared_file
from PIL import Image

from operators.utils import from_uint8
from restore import datasets as D
from restore.app.io import ImageReadError


def as_float(x_nhwc: np.ndarray) -> torch.Tensor:
    return from_uint8(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))


@pytest.fixture(scope="module")
def cifar_test_ds():
    return D.build_dataset("cifar10", split="test", root=shared_file("cifar10_test.npz").parent)


@pytest.fixture(scope="module")
def tiny_ds():
    return D.build_dataset("tinyimagenet", root=shared_file("tinyimagenet200_val_jpeg.npz").parent)


# --------------------------------------------------------------------------- real data


def test_cifar10_test_known_facts(cifar_test_ds):
    ds = cifar_test_ds
    assert len(ds) == 10000 and ds.name == "cifar10-test"
    assert ds.labels[0] == 3 and ds.classes[ds.labels[0]] == "cat"
    assert ds.filenames[0] == "domestic_cat_s_000907.png"
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    ids, x = ds.get_batch(np.arange(len(ds)))
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    mean = ((x + 1) * 127.5).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([126.02, 123.71, 114.85]), atol=0.01)


def test_cifar10_ids_stable_and_items_match_raw_pixels(cifar_test_ds, cifar_test_uint8):
    ds = cifar_test_ds
    assert ds.ids[:2] == ["cifar10-test-00000", "cifar10-test-00001"] and ds.ids[-1] == "cifar10-test-09999"
    assert ds.index("cifar10-test-00042") == 42
    image_id, x = ds[42]
    assert image_id == "cifar10-test-00042" and torch.equal(x, as_float(cifar_test_uint8[42:43])[0])
    ids, batch = ds.get_batch([42, 7, -1])
    assert ids == ["cifar10-test-00042", "cifar10-test-00007", "cifar10-test-09999"]
    assert torch.equal(batch[:2], as_float(cifar_test_uint8[[42, 7]]))
    with pytest.raises(IndexError):
        ds[10000]
    again = D.load_npz(shared_file("cifar10_test.npz"))  # by path: same ids as by name
    assert again.ids[:3] == ds.ids[:3] and again.classes == D.CIFAR10_CLASSES


def test_cifar10_batches_cover_the_requested_indices(cifar_test_ds):
    got = list(cifar_test_ds.batches(3, indices=range(10, 18)))
    assert [len(ids) for ids, _ in got] == [3, 3, 2]
    assert [i for ids, _ in got for i in ids] == [f"cifar10-test-{k:05d}" for k in range(10, 18)]


def test_tinyimagenet_decodes_to_rgb(tiny_ds):
    ds = tiny_ds
    assert len(ds) == 10000 and len(ds.classes) == 1000  # labels are ImageNet-1k indices (test_class_labels.py)
    assert len(set(ds.labels.tolist())) == 200 and ds.labels.min() >= 0 and ds.labels.max() < 1000
    image_id, x = ds[0]
    assert image_id == "tinyimagenet-val-00000" and x.shape == (3, 64, 64) and x.dtype == torch.float32
    with np.load(shared_file("tinyimagenet200_val_jpeg.npz"), allow_pickle=False) as f:
        jpeg, offsets = f["jpeg"], f["offsets"]
    pil = np.asarray(Image.open(io.BytesIO(jpeg[offsets[0] : offsets[1]].tobytes())).convert("RGB"))
    assert torch.equal(x, as_float(pil[None])[0])
    grey = [i for i in range(1000) if Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())).mode == "L"]
    assert grey, "expected grey JPEGs among the first 1000 Tiny-ImageNet images"
    ids, xs = ds.get_batch(grey[:4])
    assert xs.shape == (len(ids), 3, 64, 64)
    assert torch.equal(xs[:, 0], xs[:, 1]) and torch.equal(xs[:, 1], xs[:, 2])


# --------------------------------------------------------------------------- factory


def test_build_dataset_errors_list_the_choices(tmp_path):
    with pytest.raises(ValueError, match="cifar10.*tinyimagenet"):
        D.build_dataset("imagenet-nope")
    with pytest.raises(ValueError, match="train, test"):
        D.build_dataset("cifar10", split="val", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="BCM_RESTORE_DATA"):
        D.build_dataset("cifar10", root=tmp_path)
    np.savez(tmp_path / "odd.npz", z=np.zeros(3))
    with pytest.raises(ValueError, match="unknown npz layout"):
        D.build_dataset(tmp_path / "odd.npz")


def test_data_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BCM_RESTORE_DATA", str(tmp_path))
    assert D.data_root() == tmp_path and D.data_root("/elsewhere") == D.Path("/elsewhere")
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar10_train.npz", x=x, y=np.arange(3))
    ds = D.build_dataset("cifar10", split="train")
    assert ds.ids[2] == "cifar10-train-00002" and torch.equal(ds.get_batch([0, 1, 2])[1], as_float(x))
    monkeypatch.delenv("BCM_RESTORE_DATA")
    assert D.data_root().parts[-2:] == ("shared", "data")


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_npz_of_arrays_in_either_layout(tmp_path, layout):
    x = np.random.default_rng(1).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "my_set.npz", x=x if layout == "NHWC" else x.transpose(0, 3, 1, 2))
    ds = D.build_dataset(tmp_path / "my_set.npz")
    assert ds.ids[0] == "my-set-00000" and ds.labels is None
    assert torch.equal(ds.get_batch(range(4))[1], as_float(x))


def test_folder_dataset(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {"a.png": (4, 4), "b.png": (6, 3), "c.png": (4, 4)}
    for name, (h, w) in arrays.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    errors = []
    ds = D.build_dataset(tmp_path, on_error=lambda i, r: errors.append(i))
    assert ds.ids == ["a.png", "b.png", "c.png"] and errors == ["bad.jpg"]
    with pytest.raises(ValueError, match="different sizes"):
        ds.get_batch([0, 1])
    assert [ids for ids, _ in ds.batches(8)] == [["a.png", "c.png"], ["b.png"]]
    ids, x = next(iter(torch.utils.data.DataLoader(ds, batch_size=1)))  # works with torch's DataLoader
    assert list(ids) == ["a.png"] and torch.equal(x[0], ds[0][1])


def test_jpeg_bytes_dataset_reports_bad_entries():
    good = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(good, "PNG")
    blobs = [good.getvalue(), b"garbage!"]
    data = np.frombuffer(b"".join(blobs), np.uint8)
    ds = D.JpegBytesDataset(data, np.cumsum([0] + [len(b) for b in blobs]), "blobs")
    assert ds[0][1].shape == (3, 4, 4)
    with pytest.raises(ImageReadError, match="blobs-00001"):
        ds[1]
    with pytest.raises(ValueError):
        D.JpegBytesDataset(data, np.array([0, 5]), "short")


def test_downsampled_imagenet_npz(tmp_path):
    rng = np.random.default_rng(3)
    chw = rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    labels = np.array([1, 1000, 5, 2, 7])
    np.savez(tmp_path / "val_data.npz", data=chw.reshape(5, -1), labels=labels)
    ds = D.build_dataset(tmp_path / "val_data.npz")
    assert ds.ids[4] == "imagenet8-val_data-00004" and ds.labels.tolist() == (labels - 1).tolist()
    assert torch.equal(ds.get_batch(range(5))[1], from_uint8(torch.from_numpy(chw)))
    np.savez(tmp_path / "zero_based.npz", data=chw.reshape(5, -1), labels=labels - 1)
    with pytest.raises(ValueError, match="1-based"):
        D.build_dataset(tmp_path / "zero_based.npz")


# --------------------------------------------------------------------------- CIFAR-10 python batches


class Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2's cPickle wrote the official CIFAR-10 batches: every str and
    bytes as a byte string, numpy globals under ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_string(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_string
    dispatch[bytes] = save_string

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def dump(obj, style: str) -> bytes:
    if style == "py2":
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(obj)
        return buf.getvalue()
    return pickle.dumps(obj, protocol=int(style[-1]))


def write_cifar_python(folder, style, per_batch=6, seed=0):
    """A cifar-10-batches-py folder in the official format; returns (NCHW images, labels) train and test."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    out = {}
    for split, names in {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}.items():
        data = rng.integers(0, 256, (len(names) * per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, len(data))
        for k, name in enumerate(names):
            part = slice(k * per_batch, (k + 1) * per_batch)
            batch = {
                "batch_label": f"{name} of 5",
                "labels": [int(v) for v in labels[part]],
                "data": data[part],
                "filenames": [f"img_{split}_{i}.png" for i in range(part.start, part.stop)],
            }
            (folder / name).write_bytes(dump(batch, style))
        out[split] = data.reshape(-1, 3, 32, 32), labels
    meta = {"label_names": list(D.CIFAR10_CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(dump(meta, style))
    return out


@pytest.mark.parametrize("style", ["py2", "protocol2", "protocol5"])
def test_cifar10_python_batches(tmp_path, style):
    folder = tmp_path / "cifar-10-batches-py"
    truth = write_cifar_python(folder, style)
    if style == "py2":
        assert b"numpy.core.multiarray\n_reconstruct" in (folder / "test_batch").read_bytes()
    for split in ("train", "test"):
        ds = D.build_dataset(folder, split=split)
        images, labels = truth[split]
        assert len(ds) == len(images) and ds.ids[1] == f"cifar10-{split}-00001"
        assert ds.labels.tolist() == labels.tolist() and ds.classes == D.CIFAR10_CLASSES
        assert ds.filenames[1] == f"img_{split}_1.png"
        assert torch.equal(ds.get_batch(range(len(ds)))[1], from_uint8(torch.from_numpy(images)))
    one = D.build_dataset(folder / "data_batch_3")  # one file: ids continue where batches 1-2 end
    assert one.ids[0] == "cifar10-train-00012"
    assert torch.equal(one[0][1], from_uint8(torch.from_numpy(truth["train"][0][12])))
    with pytest.raises(ValueError, match="train, test"):
        D.build_dataset(folder, split="val")


class Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize(
    "payload",
    [
        lambda marker: {"data": Evil(os.system, f"touch {marker}")},
        lambda marker: Evil(eval, f"open({str(marker)!r}, 'w')"),
        lambda marker: {"labels": [1], "data": np.array([Evil(os.system, f"touch {marker}")], dtype=object)},
        lambda marker: {"data": np.zeros(2, dtype=[("a", "u1"), ("b", "f4")])},
        lambda marker: {"data": Evil(np.ma.core._mareconstruct, np.ndarray, np.ndarray, (0,), "b")},
    ],
    ids=["os.system", "eval", "object-array", "structured-dtype", "other-numpy"],
)
def test_malicious_pickles_are_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    data = pickle.dumps(payload(marker), protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        D.restricted_unpickle(data)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(data)
    with pytest.raises(pickle.UnpicklingError):
        D.build_dataset(folder)
    assert not marker.exists()


def test_restricted_unpickle_keeps_plain_data():
    obj = {"a": [1, 2.5, "x", b"y", (None, True)], "arr": np.arange(6, dtype=">i4").reshape(2, 3, order="F")}
    for protocol in (2, 4, 5):
        back = D.restricted_unpickle(pickle.dumps(obj, protocol=protocol))
        assert back["a"] == obj["a"]
        assert np.array_equal(back["arr"], obj["arr"]) and back["arr"].dtype == obj["arr"].dtype
