"""restore.app.io: reading every format and mode, bad files, listing, batching by size, safe writing."""

from __future__ import annotations

import csv
import logging
import os
import signal
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from operators.utils import from_uint8, quantize
from restore.app import io as rio
from restore.runtime.files import write_csv_atomic
from restore.runtime.signals import STOP_SIGNALS, interrupt_on_stop


def rgb(h=5, w=7, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(arr_or_img, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr_or_img) if isinstance(arr_or_img, np.ndarray) else arr_or_img
    img.save(path, **kw)
    return path


def errors_into(sink: list):
    return lambda image_id, reason: sink.append((image_id, reason))


# --------------------------------------------------------------------------- formats and modes


@pytest.mark.parametrize(
    "name, kw",
    [("a.png", {}), ("a.PNG", {}), ("a.bmp", {}), ("a.webp", {"lossless": True})],
)
def test_lossless_formats_read_exactly(tmp_path, name, kw):
    a = rgb()
    x = rio.read_image(save(a, tmp_path / name, **kw))
    assert x.dtype == torch.float32 and x.shape == (3, 5, 7)
    assert torch.equal(x, from_uint8(torch.from_numpy(a).permute(2, 0, 1)))


@pytest.mark.parametrize("name", ["a.jpg", "a.jpeg", "a.JPG", "a.webp"])
def test_lossy_formats_match_pillow_decoder(tmp_path, name):
    path = save(rgb(16, 16), tmp_path / name, quality=90)
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(rio.read_image_uint8(path), expected)
    assert rio.read_image(path).shape == (3, 16, 16)


def test_grey_and_bilevel_are_replicated(tmp_path):
    g = np.random.default_rng(1).integers(0, 256, (4, 6), dtype=np.uint8)
    out = rio.read_image_uint8(save(g, tmp_path / "g.png"))
    assert out.shape == (4, 6, 3) and all(np.array_equal(out[..., c], g) for c in range(3))
    bits = Image.fromarray(g > 127).convert("1")
    out = rio.read_image_uint8(save(bits, tmp_path / "b.bmp"))
    assert np.array_equal(out[..., 0], np.where(g > 127, 255, 0)) and np.ptp(out, axis=2).max() == 0


def test_palette_without_and_with_transparency(tmp_path):
    palette = np.array([[255, 0, 0], [0, 128, 255], [10, 20, 30]], dtype=np.uint8)
    index = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    img = Image.frombytes("P", (3, 2), index.tobytes())
    img.putpalette(palette.reshape(-1).tolist())
    assert np.array_equal(rio.read_image_uint8(save(img, tmp_path / "p.png")), palette[index])
    # index 1 transparent: those pixels become white, the others keep their palette colour
    out = rio.read_image_uint8(save(img, tmp_path / "pt.png", transparency=1))
    expected = palette[index].copy()
    expected[index == 1] = 255
    assert np.array_equal(out, expected)


def over_white(c: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.round((c.astype(float) * a + 255.0 * (255 - a)) / 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_over_white(tmp_path, mode):
    rng = np.random.default_rng(2)
    colour = rng.integers(0, 256, (3, 4, 3 if mode == "RGBA" else 1), dtype=np.uint8)
    alpha = np.array([[0, 1, 127, 128], [254, 255, 0, 255], [64, 200, 33, 99]], dtype=np.uint8)[..., None]
    img = Image.fromarray(np.concatenate([colour, alpha], axis=2))
    assert img.mode == mode
    out = rio.read_image_uint8(save(img, tmp_path / f"{mode}.png"))
    expected = np.broadcast_to(over_white(colour, alpha), (3, 4, 3))
    assert np.array_equal(out, expected)
    assert (out[alpha[..., 0] == 0] == 255).all()


def test_sixteen_bit_grey_scaled_to_eight_bit(tmp_path):
    v = np.array([[0, 1, 128, 129, 257], [32767, 32768, 65279, 65534, 65535]], dtype=np.uint16)
    img = Image.fromarray(v)
    assert img.mode.startswith("I;16")
    out = rio.read_image_uint8(save(img, tmp_path / "g16.png"))
    expected = np.round(v.astype(float) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.ptp(out, axis=2).max() == 0
    # 8-bit data expanded the usual way (v * 257) comes back exactly
    eight = np.arange(256, dtype=np.uint16).reshape(16, 16)
    out = rio.read_image_uint8(save(Image.fromarray(eight * 257), tmp_path / "x257.png"))
    assert np.array_equal(out[..., 0], eight)


def test_cmyk_jpeg_converted_to_rgb(tmp_path):
    cmyk = np.zeros((8, 32, 4), np.uint8)
    cmyk[:, 8:16, 0] = 255  # cyan
    cmyk[:, 16:24, 3] = 255  # black
    cmyk[:, 24:, 1] = 255  # magenta
    out = rio.read_image_uint8(save(Image.fromarray(cmyk, "CMYK"), tmp_path / "c.jpg", quality=100)).astype(int)
    for block, colour in enumerate([(255, 255, 255), (0, 255, 255), (0, 0, 0), (255, 0, 255)]):
        assert np.abs(out[2:6, 8 * block + 2 : 8 * block + 6] - colour).max() <= 3


@pytest.mark.parametrize("orientation, turn", [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                               (8, lambda a: np.rot90(a, 1))])
@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_exif_orientation_applied(tmp_path, orientation, turn, fmt):
    a = rgb(4, 6)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(a, tmp_path / f"o.{fmt}", exif=exif, **({"lossless": True} if fmt == "webp" else {}))
    out = rio.read_image_uint8(path)
    assert np.array_equal(out, turn(a))
    assert rio.image_size(path) == out.shape[:2]


def test_bytes_and_file_objects(tmp_path):
    path = save(rgb(), tmp_path / "a.png")
    with open(path, "rb") as f:
        from_file = rio.read_image_uint8(f)
    from_bytes = rio.read_image_uint8(path.read_bytes())
    assert np.array_equal(from_file, from_bytes) and from_bytes.flags.writeable


# --------------------------------------------------------------------------- bad files


def make_bad_files(folder):
    good = save(rgb(8, 8), folder / "good.png")
    data = good.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    (folder / "header_only.png").write_bytes(data[:20])
    (folder / "noise.jpg").write_bytes(np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (folder / "empty.webp").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return {"truncated.png", "header_only.png", "noise.jpg", "empty.webp", "notes.txt"}


@pytest.mark.parametrize("name", ["truncated.png", "header_only.png", "noise.jpg", "empty.webp", "notes.txt"])
def test_read_image_raises_one_line_error(tmp_path, name):
    make_bad_files(tmp_path)
    with pytest.raises(rio.ImageReadError) as info:
        rio.read_image(tmp_path / name)
    assert name in str(info.value) and "\n" not in str(info.value) and info.value.reason


def test_bad_files_are_reported_and_skipped(tmp_path):
    bad = make_bad_files(tmp_path)
    errors = []
    batches = list(rio.iter_batches(tmp_path, 4, on_error=errors_into(errors)))
    assert [ids for ids, _ in batches] == [["good.png"]]
    assert {i for i, _ in errors} == bad
    assert all(reason and "\n" not in reason for _, reason in errors)


def test_default_error_report_is_a_logging_warning(tmp_path, caplog):
    make_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="restore.app.io"):
        folder = rio.ImageFolder(tmp_path)
        list(folder.batches(2))
    assert folder.ids == ["good.png", "truncated.png"]  # truncated passes the header check ...
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in logged for name in ("truncated.png", "noise.jpg", "notes.txt"))  # ... and fails decoding


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        rio.list_images(tmp_path / "nope")
    with pytest.raises(NotADirectoryError):
        rio.list_images(save(rgb(), tmp_path / "a.png"))


# --------------------------------------------------------------------------- listing, ids, batching


def build_tree(root):
    for rel in ["b.png", "a.jpg", "a.png", "sub/c.bmp", "sub/deeper/d.webp", "Z.PNG", ".hidden.png", ".cache/e.png",
                "sub/.f.png"]:
        save(rgb(4, 4), root / rel)


def test_listing_flat_and_recursive(tmp_path):
    build_tree(tmp_path)
    flat = [rio.image_id(p, tmp_path) for p in rio.list_images(tmp_path)]
    assert flat == ["Z.PNG", "a.jpg", "a.png", "b.png"]
    deep = [rio.image_id(p, tmp_path) for p in rio.list_images(tmp_path, recursive=True)]
    assert deep == ["Z.PNG", "a.jpg", "a.png", "b.png", "sub/c.bmp", "sub/deeper/d.webp"]


def test_ids_do_not_depend_on_how_the_root_is_spelled(tmp_path, monkeypatch):
    build_tree(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    relative = rio.ImageFolder("data", recursive=True)
    absolute = rio.ImageFolder(tmp_path / "data" / ".." / "data", recursive=True)
    assert relative.ids == absolute.ids == sorted(relative.ids)


def test_batches_group_by_size_in_stable_order(tmp_path):
    sizes = {"0.png": (4, 6), "1.png": (5, 5), "2.png": (4, 6), "3.png": (4, 6), "4.png": (5, 5), "5.png": (4, 6)}
    arrays = {name: rgb(*hw, seed=k) for k, (name, hw) in enumerate(sizes.items())}
    for name, a in arrays.items():
        save(a, tmp_path / name)
    batches = list(rio.iter_batches(tmp_path, 2))
    assert [ids for ids, _ in batches] == [["0.png", "2.png"], ["3.png", "5.png"], ["1.png", "4.png"]]
    for ids, x in batches:
        assert x.dtype == torch.float32 and x.is_contiguous()
        assert torch.equal(x, torch.stack([rio.read_image(tmp_path / i) for i in ids]))
    resumed = list(rio.iter_batches(tmp_path, 2, skip={"0.png", "4.png"}, workers=2))
    assert [ids for ids, _ in resumed] == [["1.png"], ["2.png", "3.png"], ["5.png"]]  # 1.png now comes first
    for ids, x in resumed:
        assert torch.equal(x, torch.stack([rio.read_image(tmp_path / i) for i in ids]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([(1, 1), (2, 3), (3, 2)]), max_size=20), st.integers(1, 5))
def test_group_by_size_properties(sizes, batch_size):
    groups = rio.group_by_size(sizes, batch_size)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert all(0 < len(g) <= batch_size and len({sizes[i] for i in g}) == 1 for g in groups)
    assert all(g == sorted(g) for g in groups)
    firsts = [sizes.index(s) for s in dict.fromkeys(sizes)]
    assert [sizes[g[0]] for g in groups if g[0] in firsts] == list(dict.fromkeys(sizes))


def test_group_by_size_rejects_bad_batch_size():
    with pytest.raises(ValueError):
        rio.group_by_size([(1, 1)], 0)


# --------------------------------------------------------------------------- writing


def test_write_png_round_trips_to_quantised_tensor(tmp_path):
    x = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # also out of range
    path = rio.write_png(x, tmp_path / "out" / "deep" / "x.png")
    assert sorted(os.listdir(path.parent)) == ["x.png"]
    assert torch.equal(rio.read_image(path), quantize(x))
    rio.write_png(torch.zeros(1, 3, 9, 11), path)  # overwriting an output is fine; a batch of one is accepted
    assert torch.equal(rio.read_image(path), quantize(torch.zeros(3, 9, 11)))


def test_write_png_grey_and_refusals(tmp_path):
    g = torch.linspace(-1, 1, 12).reshape(1, 3, 4)
    out = rio.read_image(rio.write_png(g, tmp_path / "g.png"))
    assert torch.equal(out, quantize(g).expand(3, -1, -1))
    with pytest.raises(ValueError, match="NaN"):
        rio.write_png(torch.full((3, 2, 2), float("nan")), tmp_path / "n.png")
    with pytest.raises(ValueError):
        rio.write_png(torch.zeros(2, 3, 4, 4), tmp_path / "b.png")
    assert sorted(os.listdir(tmp_path)) == ["g.png"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        rio.write_png(torch.zeros(3, 2, 2), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_refuse_output_folder_equal_to_or_inside_input(tmp_path):
    src = tmp_path / "in"
    build_tree(src)
    for same in (src, tmp_path / "in" / "sub" / "..", tmp_path / "link"):
        if same.name == "link":
            os.symlink(src, same)
        with pytest.raises(rio.OutputError, match="input folder"):
            rio.check_output_dir(src, same)
    with pytest.raises(rio.OutputError, match="recursively"):
        rio.check_output_dir(src, src / "restored", recursive=True)
    assert rio.check_output_dir(src, src / "restored") == src / "restored"
    with pytest.raises(rio.OutputError):
        rio.OutputGuard.for_folder(rio.ImageFolder(src), src)


def test_guard_never_overwrites_an_input(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    save(rgb(), src / "x.png")
    ref = save(rgb(), tmp_path / "ref" / "y.png")
    out.mkdir()
    os.symlink(src / "x.png", out / "x.png")  # an output name that resolves onto an input
    os.symlink(ref, out / "y.png")
    guard = rio.OutputGuard.for_folder(rio.ImageFolder(src), out, protect=[ref])
    before = (src / "x.png").read_bytes(), ref.read_bytes()
    for image_id in ("x.png", "y.png"):
        with pytest.raises(rio.OutputError, match="overwrite"):
            guard.write_png(torch.zeros(3, 5, 7), image_id)
    with pytest.raises(rio.OutputError, match="overwrite"):
        guard.write_batch(torch.zeros(2, 3, 5, 7), ["new.png", "x.png"])
    assert not (out / "new.png").exists()  # every target is checked before anything is written
    with pytest.raises(rio.OutputError, match="overwrite"):
        rio.write_png(torch.zeros(3, 5, 7), src / "x.png", protect=[src / "x.png"])
    assert ((src / "x.png").read_bytes(), ref.read_bytes()) == before


def test_guard_names_keep_subfolders_and_avoid_clashes(tmp_path):
    src = tmp_path / "in"
    build_tree(src)
    folder = rio.ImageFolder(src, recursive=True)
    guard = rio.OutputGuard.for_folder(folder, tmp_path / "out")
    x = torch.zeros(len(folder), 3, 4, 4)
    written = guard.write_batch(x, folder.ids)
    rel = sorted(p.relative_to(tmp_path / "out").as_posix() for p in written)
    assert rel == ["Z.png", "a.jpg.png", "a.png", "b.png", "sub/c.png", "sub/deeper/d.png"]
    assert not any(name.endswith(".tmp") for _, _, files in os.walk(tmp_path / "out") for name in files)
    assert rio.output_path(tmp_path, "sub/c.bmp") == tmp_path / "sub" / "c.png"
    for bad in ("../escape.png", "/abs.png"):
        with pytest.raises(rio.OutputError):
            rio.output_path(tmp_path, bad)
    with pytest.raises(ValueError):
        guard.write_batch(x[:2], folder.ids[:3])


def test_write_csv_atomic_rows_and_dataframe(tmp_path):
    import pandas as pd
    rows = [{"image_id": "a.png", "psnr": 30.5}, {"image_id": "b,c.png", "psnr": 28.0, "ssim": 0.9}]
    path = write_csv_atomic(rows, tmp_path / "m.csv")
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["image_id"] for r in back] == ["a.png", "b,c.png"] and list(back[0]) == ["image_id", "psnr", "ssim"]
    write_csv_atomic(pd.DataFrame(rows), path)
    assert pd.read_csv(path)["image_id"].tolist() == ["a.png", "b,c.png"]
    assert sorted(os.listdir(tmp_path)) == ["m.csv"]


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_a_stop_signal_interrupts_the_block_and_the_handlers_come_back(sig):
    before = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt, match=signal.Signals(sig).name), interrupt_on_stop():
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(sig) is before
