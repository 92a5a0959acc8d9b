"""Restore every image of a folder with one method and operator: the engine behind ``restore run``.

:func:`run_folder` reads ``INPUT_DIR`` (:class:`restore.app.io.ImageFolder`), restores each image with a
registered method (:mod:`restore.methods`) and writes, under ``OUTPUT_DIR``:

* ``<image id>.png`` per image (sub-folders kept, suffix ``.png``; :class:`restore.app.io.OutputGuard`
  never overwrites an input and refuses ``OUTPUT_DIR == INPUT_DIR``);
* ``degraded/<image id>.png`` with ``degrade=True``: the inputs are then clean images, degraded
  first with ``op.draw`` / ``op.measure`` (the drawn operator, e.g. randbox's boxes, restores the
  batch); the method sees the measurement as the benchmark runner does (float; noise and resampling are
  not re-quantised), so ``restore run --degrade`` and ``restore-bench run`` give the same image for the
  same id and seed; the PNG in ``degraded/`` is its 8-bit copy (identical for JPEG);
* ``manifest.csv`` (:data:`COLUMNS`, one row per image id; rewritten atomically every
  :data:`MANIFEST_EVERY_S` seconds and when the run ends, fails or is interrupted):
  status ``ok`` or ``error`` (unreadable files are reported and skipped, never fatal), output files,
  output size, number of tiles, wall-clock seconds (a batch's time split evenly over its images),
  the counted NFE of the restoration (network forward calls and backward passes made for the
  image's batch; for a tiled image, summed over its batches of tiles) and per-image metrics on the
  saved 8-bit images: ``psnr`` and ``ssim`` against a reference (the clean input with ``degrade``, or the image with the
  same id, extension ignored, in ``reference``) and ``cpsnr``, the consistency PSNR against the measurement
  ``y`` (the measured ``y`` with ``degrade``; otherwise the input itself, which *is* ``y``);
* ``run.json``: the settings that determine the outputs, plus the speed options (bf16, channels_last, compile:
  rounding only, so a run resumes across them) and the environment.

Class labels (``class_labels``, ``restore run --class-labels FILE|INT``): a class-conditional model
(``num_classes > 0``) needs one label per image, from a ``file,label`` CSV (``restore.app.io.read_labels``;
``file`` is the image id) or one integer for every image; they reach every network call of the method
(tiles inherit their image's label); ``run.json`` records the integer, or the file with its sha256. A
conditional model without labels, labels for an unconditional model
or a method without a network, and an image missing from the CSV are :class:`RunError` before any work.

Resuming: a second call restores only images without an ``ok`` manifest row and an existing
output file, so an interrupted run continues where it stopped; the settings must match the
previous run's ``run.json`` (a mix of settings in one folder would be unusable) unless
``overwrite=True``, which restores everything again.

Randomness is per image and the same as the benchmark runner's (`restore.runtime.seeds`): the same image
id and seed give the same measurement and the same restoration whatever the batch size or order.

Sizes: images whose output size is the network's native size ``T`` are batched (equal sizes only,
:func:`restore.app.io.group_by_size`); others are restored in overlapping ``T`` x ``T`` tiles
(:mod:`restore.app.tiling`) when the operator acts locally (``jpeg``, ``down``), and refused with a
:class:`RunError` naming the size the model takes otherwise (masks; ``blur``, whose circular boundary couples
opposite borders). Methods
without a network restore whole images of any size unless ``tile`` is given.

The restoration runs under ``torch.inference_mode()`` unless the method sets ``needs_grad``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from operators import build_operator
from restore.app.io import ImageFolder, OutputError, OutputGuard, check_output_dir, read_image, read_labels
from restore.app.tiling import tile_rule, tiled_restore
from restore.engine.acceleration import OFF, Acceleration
from restore.engine.nfe import NFECount
from restore.engine.wrappers import check_operator, class_conditioning, serves
from restore.methods import get_method
from restore.quality import consistency_psnr, psnr, ssim
from restore.records.provenance import environment
from restore.runtime.files import write_csv_atomic, write_text_atomic
from restore.runtime.progress import progress_bar
from restore.runtime.seeds import measurement_generators, restoration_generators, tile_id

__all__ = ["COLUMNS", "RunError", "RunSummary", "parse_hparams", "run_folder"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
RUN_FILE = "run.json"
DEGRADED_DIR = "degraded"
MANIFEST_EVERY_S = 5.0  # the manifest is also written when the run ends, fails or is interrupted
COLUMNS = ("image_id", "status", "output", "degraded", "height", "width", "tiles", "seconds",
           "nfe_forward", "nfe_backward", "psnr", "ssim", "cpsnr", "note")
_RESERVED = ("model", "y", "op", "nfe", "generator", "callback", "class_labels")


class RunError(ValueError):
    """A user error that stops a run before it writes anything (one line: what is wrong and what to do)."""


@dataclass
class RunSummary:
    """What a call of :func:`run_folder` did; ``rows`` is the whole manifest (also earlier runs' rows)."""

    output_dir: Path
    manifest: Path
    restored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


def parse_hparams(items: Iterable[str]) -> dict[str, Any]:
    """``["eta=0.5", "schedule=karras", "refine=true"]`` -> dict; values are JSON if they parse, else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise RunError(f"hyper-parameter {item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_folder(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    operator: str,
    method: str,
    nfe: int | None = None,
    model: str | Path | nn.Module | None = None,
    degrade: bool = False,
    reference: str | Path | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    recursive: bool = False,
    overwrite: bool = False,
    hparams: Mapping[str, Any] | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    class_labels: str | int | Path | None = None,
    progress: bool = False,
    on_error: Callable[[str, str], None] | None = None,
    acceleration: Acceleration = OFF,
) -> RunSummary:
    """Restore every image of ``input_dir`` into ``output_dir`` (see the module docstring).

    ``model``: checkpoint path, bundled name or a loaded wrapper (None for methods with ``model="none"``).
    ``tile``: output tile side (default: the network's native resolution); ``overlap``: minimum tile
    overlap in measurement pixels (default: a quarter tile). ``class_labels``: a ``file,label`` CSV or one
    integer (module docstring). ``on_error(image_id, reason)`` hears about every skipped file (default: a logging
    warning). ``acceleration``: bf16 / channels_last / compile of the network (`restore.engine.acceleration`; a
    loaded ``model`` is changed in place). User errors raise :class:`RunError`.
    """
    if batch_size < 1:
        raise RunError(f"batch size must be >= 1, got {batch_size}")
    try:
        op = build_operator(operator)
        meth = get_method(method)
    except ValueError as e:
        raise RunError(str(e)) from None
    if not meth.supports(op):
        raise RunError(f"method {meth.name!r} does not support operator {op.name!r}; "
                       f"it supports: {', '.join(meth.operators)}")
    if degrade and reference is not None:
        raise RunError("--degrade uses the inputs as references; drop --reference")
    if op.random and not degrade:
        raise RunError(f"{op.name} draws its mask while measuring, so it needs --degrade "
                       "(for a fixed box use box:...)")
    hparams = dict(hparams or {})
    _check_hparams(meth, hparams)
    nfe = meth.default_nfe if nfe is None else nfe
    out = Path(output_dir)
    try:
        check_output_dir(input_dir, out, recursive)
    except OutputError as e:
        raise RunError(str(e)) from None
    net, model_label = _load(model, meth, device, acceleration)
    try:
        check_operator(net, op)  # conditional models (Palette, I2SB) restore only their own degradation
    except ValueError as e:
        raise RunError(f"{model_label}: {e}") from None
    labels, labels_setting = _class_labels(class_labels, net, meth)
    if tile is None and net is not None:
        tile = getattr(getattr(getattr(net, "net", None), "config", None), "img_resolution", None)

    rule = tile_rule(op)
    scale = rule.scale if rule else 1
    if tile is not None and rule is not None:
        t = tile // scale
        overlap = min(t // 4, t - rule.align) if overlap is None else overlap
        if not 0 <= overlap <= t - rule.align:
            raise RunError(f"tile overlap must be in [0, {t - rule.align}] measurement pixels for {t}-pixel tiles "
                           f"on {op.name}'s {rule.align}-pixel grid, got {overlap}")
    settings = json.loads(json.dumps({
        "operator": op.spec, "method": meth.name, "nfe": nfe, "model": model_label, "degrade": degrade,
        "seed": seed, "hparams": hparams, "tile": tile, "overlap": overlap,
        **({"class_labels": labels_setting} if labels_setting is not None else {}),  # old run.json files stay valid
    }))
    rows = _resume(out, settings, overwrite)

    failed: dict[str, str] = {}

    def report(image_id: str, reason: str) -> None:
        failed[image_id] = reason
        (on_error or _warn)(image_id, reason)

    try:
        folder = ImageFolder(input_dir, recursive, on_error=report)
    except OSError as e:
        raise RunError(str(e)) from None
    refs = _References(reference, recursive) if reference is not None else None
    protect = refs.folder.paths if refs else []
    try:
        guard = OutputGuard.for_folder(folder, out, protect=protect)
        degraded = OutputGuard(out / DEGRADED_DIR, [*folder.paths, *protect], folder.ids) if degrade else None
    except OutputError as e:
        raise RunError(str(e)) from None
    if degraded and any((out / DEGRADED_DIR) in guard.path(i).parents for i in folder.ids):
        raise RunError(f"an input lies in a folder named {DEGRADED_DIR!r}, where --degrade saves measurements; "
                       "rename it")
    done = {i for i in folder.ids if i in rows and rows[i]["status"] == "ok" and (out / rows[i]["output"]).is_file()}
    todo = [k for k, i in enumerate(folder.ids) if i not in done]
    if isinstance(labels, dict):
        _check_label_file(labels, [folder.ids[k] for k in todo], net, labels_setting["file"])
    sizes = _plan_sizes(folder, todo, op, degrade, scale, tile, rule is not None)

    out.mkdir(parents=True, exist_ok=True)
    record = {"settings": settings, "acceleration": acceleration.to_dict(), "environment": environment(device)}
    write_text_atomic(json.dumps(record, indent=2), out / RUN_FILE)
    summary = RunSummary(out, out / MANIFEST, skipped=sorted(done))

    job = _Job(meth, net, nfe, hparams, seed, device, tile, overlap, rule, batch_size, labels)
    grad = contextlib.nullcontext() if meth.needs_grad else torch.inference_mode()
    saved = time.monotonic()
    try:
        with grad, progress_bar("restore", enabled=progress) as bar:
            task = bar.add_task("restore", total=len(todo))
            for ids, x in folder.batches(batch_size, skip=done):
                x = x.to(device)
                batch_op, y = op, x
                if degrade:
                    gens = measurement_generators(seed, ids)
                    batch_op = op.draw(x.shape, gens, device=x.device)  # randbox / randmask: this batch's mask
                    y = batch_op.measure(x, gens)  # as the benchmark runner: noise in float, not re-quantised
                if degraded:
                    degraded.write_batch(y, ids)
                x_hat, stats = job.restore(ids, y, batch_op, tiled=tile is not None and sizes[ids[0]] != (tile, tile))
                paths = guard.write_batch(x_hat, ids)
                metrics = _metrics(x_hat, y, batch_op, x if degrade else refs.load(ids, x_hat) if refs else None)
                for k, (image_id, (n_tiles, seconds, tally)) in enumerate(zip(ids, stats)):
                    rows[image_id] = {
                        "image_id": image_id, "status": "ok", "output": paths[k].relative_to(out).as_posix(),
                        "degraded": degraded.path(image_id).relative_to(out).as_posix() if degraded else "",
                        "height": x_hat.shape[-2], "width": x_hat.shape[-1], "tiles": n_tiles, "seconds": seconds,
                        "nfe_forward": tally.forward, "nfe_backward": tally.backward, **metrics[k],
                    }
                summary.restored += ids
                bar.advance(task, len(ids))
                if time.monotonic() - saved >= MANIFEST_EVERY_S:  # rewriting is O(rows): not after every batch
                    _write_manifest(out, rows, failed)
                    saved = time.monotonic()
    finally:  # also on errors and Ctrl-C, so the next run skips what is done
        summary.rows = _write_manifest(out, rows, failed)
    summary.failed = dict(failed)
    return summary


# --------------------------------------------------------------------------- set-up


def _warn(image_id: str, reason: str) -> None:
    logger.warning("skipping %s: %s", image_id, reason)


def _check_hparams(meth, hparams: Mapping[str, Any]) -> None:
    """Refuse hyper-parameters the method does not take (unless it takes ``**kwargs``)."""
    clash = sorted(set(hparams) & set(_RESERVED))
    if clash:
        raise RunError(f"{', '.join(clash)} cannot be set as hyper-parameters")
    params = inspect.signature(meth.fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _RESERVED]
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise RunError(f"method {meth.name!r} has no hyper-parameter {', '.join(unknown)}; "
                       f"valid: {', '.join(valid) or '(none)'}")


def _load(model, meth, device, acceleration: Acceleration = OFF) -> tuple[nn.Module | None, str | None]:
    """The network the method needs (moved to ``device``, with ``acceleration`` applied) and how run.json names it."""
    if meth.model == "none":
        if model is not None:
            raise RunError(f"method {meth.name!r} uses no network; drop --model")
        return None, None
    if model is None:
        raise RunError(f"method {meth.name!r} needs a {meth.model} model: "
                       "pass --model NAME|PATH (see `restore models`)")
    if isinstance(model, nn.Module):
        net, label = model, f"<{type(model).__name__} object>"
    else:
        from restore.engine.checkpoints import load_model

        path = Path(model)
        label = str(path.resolve()) if path.is_file() else str(model)
        try:
            net = load_model(model, device=device)
        except (ValueError, OSError) as e:
            raise RunError(str(e).splitlines()[0]) from None
    kind = getattr(net, "kind", None)
    if not serves(net, meth.model):  # a BCM is also a CM, a VP-epsilon denoiser an EDM denoiser
        raise RunError(f"method {meth.name!r} needs a {meth.model} model, but {label} is a {kind} model")
    return acceleration.apply(net.to(device).eval()), label


def _class_labels(spec, net, meth) -> tuple[dict[str, int] | int | None, dict | int | None]:
    """The run's labels (image id -> label, one int, or None) and how run.json records them; RunError when they
    do not fit the model (conditional without labels, labels for an unconditional model or no network)."""
    if spec is None:
        labels, setting = None, None
    elif isinstance(spec, int) or str(spec).strip().isdigit():
        labels = setting = int(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise RunError(f"--class-labels {spec}: neither an integer nor a file")
        try:
            labels = read_labels(path)
        except (ValueError, OSError) as e:
            raise RunError(str(e)) from None
        # the file's content, not only its path, decides whether a resumed run is the same run
        setting = {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if labels is not None and net is None:
        raise RunError(f"method {meth.name!r} uses no network, so class labels do nothing; drop --class-labels")
    try:
        class_conditioning(net, None if labels is None else 0, 1)  # conditional <=> labels given
        if isinstance(labels, int):
            class_conditioning(net, labels, 1)  # in range
    except ValueError as e:
        raise RunError(str(e)) from None
    return labels, setting


def _check_label_file(labels: dict[str, int], ids: list[str], net, source) -> None:
    """Every image to restore has a label in the file, within the model's classes."""
    missing = [i for i in ids if i not in labels]
    if missing:
        raise RunError(f"{source} has no label for {len(missing)} image(s), e.g. {', '.join(missing[:3])}")
    try:
        class_conditioning(net, [labels[i] for i in ids], len(ids))
    except ValueError as e:
        raise RunError(f"{source}: {e}") from None


def _resume(out: Path, settings: dict, overwrite: bool) -> dict[str, dict]:
    """Manifest rows of an earlier run in ``out`` with the same settings ({} with ``overwrite``)."""
    if overwrite:
        return {}
    run_file = out / RUN_FILE
    if run_file.is_file():
        previous = json.loads(run_file.read_text()).get("settings", {})
        diffs = [f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in settings.items() if previous.get(k) != v]
        if diffs:
            raise RunError(f"{out} holds a run with other settings ({'; '.join(diffs)}); "
                           "choose another output folder or pass --overwrite")
    manifest = out / MANIFEST
    if not manifest.is_file():
        return {}
    with manifest.open(newline="", encoding="utf-8") as f:
        return {row["image_id"]: row for row in csv.DictReader(f)}


def _plan_sizes(folder: ImageFolder, todo: list[int], op, degrade: bool, scale: int, tile: int | None,
                tileable: bool) -> dict[str, tuple[int, int]]:
    """Output size of every image to restore; RunError before any work if an image cannot be restored."""
    sizes, wrong = {}, []
    for k in todo:
        image_id, (h, w) = folder.ids[k], folder.sizes[k]
        if degrade:
            try:
                op.output_shape((1, 3, h, w))
            except ValueError as e:
                raise RunError(f"{image_id}: {e}") from None
            size = (h, w)
        else:
            size = (h * scale, w * scale)
        sizes[image_id] = size
        if tile is not None and size != (tile, tile):
            wrong.append(f"{image_id} ({h}x{w})")
    if tile is not None and tile % scale:
        raise RunError(f"the model's size {tile} is not a multiple of the operator's factor {scale}")
    if wrong and not tileable:
        side = tile if degrade else tile // scale
        raise RunError(f"operator {op.spec} does not act locally, so images cannot be restored in tiles: "
                       f"the model takes {side}x{side} inputs; {len(wrong)} image(s) differ, "
                       f"e.g. {', '.join(wrong[:3])}")
    return sizes


# --------------------------------------------------------------------------- restoring


@dataclass(frozen=True)
class _Job:
    """One method with its model and settings, restoring batches of measurements (each with its operator)."""

    meth: Any
    net: nn.Module | None
    nfe: int
    hparams: dict[str, Any]
    seed: int
    device: Any
    tile: int | None
    overlap: int | None
    rule: Any
    batch_size: int
    labels: dict[str, int] | int | None = None  # class labels by image id, or one for all (module docstring)

    def restore(self, ids: list[str], y: torch.Tensor, op, tiled: bool
                ) -> tuple[torch.Tensor, list[tuple[int, float, NFECount]]]:
        """Restore ``y`` (one size) measured by ``op``; per image (tiles, seconds, counted NFE). A batch's cost
        is shared evenly."""
        if not tiled:
            x_hat, tally, seconds = self._timed(lambda: self._call(y, op, ids, self._labels(ids)))
            return x_hat, [(1, seconds / len(ids), tally)] * len(ids)
        parts, stats = [], []
        for k, image_id in enumerate(ids):
            part, stat = self._restore_tiled(image_id, y[k:k + 1], op)
            parts.append(part)
            stats.append(stat)
        return torch.cat(parts), stats

    def _restore_tiled(self, image_id: str, y: torch.Tensor, op
                       ) -> tuple[torch.Tensor, tuple[int, float, NFECount]]:
        """Restore one image ``y`` (1, C, H, W) tile by tile; returns it and its (tiles, seconds, counted NFE)."""
        keys_seen: list[int] = []

        def restore_tiles(tiles: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
            keys_seen.extend(keys)
            labels = self._labels([image_id] * len(keys))  # every tile is conditioned on its image's class
            return self._call(tiles, op, [tile_id(image_id, key) for key in keys], labels)

        part, tally, seconds = self._timed(lambda: tiled_restore(
            restore_tiles, y, tile=self.tile, overlap=self.overlap, rule=self.rule, batch_size=self.batch_size))
        return part, (len(keys_seen), seconds, tally)

    def _labels(self, ids: list[str]) -> list[int] | None:
        if self.labels is None:
            return None
        return [self.labels] * len(ids) if isinstance(self.labels, int) else [self.labels[i] for i in ids]

    def _call(self, y: torch.Tensor, op, keys: list[str], labels: list[int] | None) -> torch.Tensor:
        gens = restoration_generators(self.seed, keys, self.device)
        return self.meth(self.net, y, op, nfe=self.nfe, generator=gens, class_labels=labels, **self.hparams)

    def _timed(self, fn) -> tuple[torch.Tensor, NFECount, float]:
        """Run ``fn()`` counting the network's evaluations; returns (result, tally, seconds)."""
        net = self.net
        counting = net.counter.counting() if hasattr(net, "counter") else contextlib.nullcontext(NFECount())
        sync = torch.cuda.synchronize if torch.device(self.device).type == "cuda" else (lambda: None)
        with counting as tally:
            sync()
            start = time.perf_counter()
            result = fn()
            sync()
            seconds = time.perf_counter() - start
        return result, NFECount(tally.forward, tally.backward), seconds


# --------------------------------------------------------------------------- metrics and manifest


class _References:
    """Reference images matched by image id, or by id without extension when that is unique."""

    def __init__(self, root, recursive: bool):
        try:
            self.folder = ImageFolder(root, recursive)
        except OSError as e:
            raise RunError(f"reference folder: {e}") from None
        self.paths = dict(zip(self.folder.ids, self.folder.paths))
        stems: dict[str, list[Path]] = {}
        for i, p in self.paths.items():
            stems.setdefault(str(Path(i).with_suffix("")), []).append(p)
        self.by_stem = {s: ps[0] for s, ps in stems.items() if len(ps) == 1}

    def load(self, ids: Sequence[str], like: torch.Tensor) -> list[torch.Tensor | str]:
        """Each id's reference (1, C, H, W) on ``like``'s device, or a note saying why there is none."""
        out = []
        for i in ids:
            path = self.paths.get(i) or self.by_stem.get(str(Path(i).with_suffix("")))
            if path is None:
                out.append("no reference")
                continue
            try:
                ref = read_image(path)[None].to(like.device)
            except Exception as e:  # an unreadable reference costs its metrics only
                out.append(f"reference unreadable: {str(e).splitlines()[0]}")
                continue
            if ref.shape[-2:] != like.shape[-2:]:
                out.append(f"reference is {ref.shape[-2]}x{ref.shape[-1]}, output {like.shape[-2]}x{like.shape[-1]}")
            else:
                out.append(ref)
        return out


def _metrics(x_hat: torch.Tensor, y: torch.Tensor, op, refs) -> list[dict[str, Any]]:
    """Per-image psnr / ssim (when a reference exists) and cpsnr, plus a note for missing metrics."""
    cpsnr = consistency_psnr(x_hat, y, op).tolist()
    rows = []
    for k in range(x_hat.shape[0]):
        row = {"psnr": "", "ssim": "", "cpsnr": cpsnr[k], "note": ""}
        ref = refs[k : k + 1] if isinstance(refs, torch.Tensor) else refs[k] if refs is not None else None
        if isinstance(ref, str):
            row["note"] = ref
        elif ref is not None:
            row["psnr"] = psnr(x_hat[k : k + 1], ref).item()
            try:
                row["ssim"] = ssim(x_hat[k : k + 1], ref).item()
            except ValueError as e:  # images smaller than the SSIM window
                row["note"] = str(e)
        rows.append(row)
    return rows


def _write_manifest(out: Path, rows: dict[str, dict], failed: Mapping[str, str]) -> list[dict[str, Any]]:
    """Write ``rows`` plus an error row per file that failed in this run, sorted by id, atomically."""
    rows.update({i: {"image_id": i, "status": "error", "note": reason} for i, reason in failed.items()})
    ordered = [{c: rows[i].get(c, "") for c in COLUMNS} for i in sorted(rows)]
    write_csv_atomic(ordered, out / MANIFEST)
    return ordered
