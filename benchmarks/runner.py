"""Run a benchmark suite into a resumable long-format results table (DESIGN.md §4.4, §4.5, §6).

Layout of an output folder::

    records/rank<r>.jsonl   append-only journal of each writing process: result rows and "done" marks
    degraded/<op>-seed<s>-<hash>/<image>.npy   cached measurements y (float32, exact), made once
    degraded/.../<image>.png, reference/<image>.png   degraded input and ground truth of the grid images
    outputs/<op>/<method>/nfe<k>-seed<s>-<hash>/<image>.png   restorations (8-bit; metrics use these values)
    results.csv             the long table of the current suite (merged from every journal)
    run.json                resolved suite, cells, environment (versions, git commit, device), timing
    runs.jsonl              environment and summary of every session that added results

**Cells.** A cell is operator x method entry x NFE budget x seed. Its key is a hash of its resolved
configuration (dataset, operator spec, method, hyper-parameters, the model's weights hash -- card edits do
not count --, NFE, seed),
so editing a suite invalidates exactly the cells whose configuration changed; labels and the metric
list are not part of the key (metrics added later are computed from the saved PNGs).

**Durability.** After each batch the process appends the batch's rows and one ``done`` line naming the
unit (cell, images, metrics) in a single write, then flushes and fsyncs. Rows count only when their
unit's ``done`` line exists, and a torn last line is cut off before appending, so ``kill -9`` loses at
most the batch in progress; restarting the same command recomputes nothing that finished.

**Randomness.** Measurement noise / random boxes use ``make_generators(seed, ids)``; methods get
generators seeded from ``(seed, id + "/restore")`` so their noise is independent of the measurement
noise. Results depend on neither batch size, order nor the number of processes.

**Sharding.** Under ``torchrun`` (``WORLD_SIZE`` > 1) rank r takes images r, r + W, ... of each cell
(strided), writes its own journal, and rank 0 computes the set metrics (FID / KID from the saved PNGs
of all ranks) after a barrier and merges all journals into ``results.csv``: the same table one process
writes.

Timing: ``seconds`` is the wall time of the method call per image (batch time / batch size, after a
CUDA synchronise); ``nfe`` is the counted number of network forward passes per image, ``nfe_backward``
the counted backward passes (DPS-style guidance).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from benchmarks.suites import Suite, config_hash
from operators import build_operator
from operators.utils import make_generators
from restore.records.provenance import git_state

RUNNER_VERSION = 1  # part of every cell key: bump when the runner's numbers change meaning
GRID_IMAGES = 8  # degraded input and ground truth are kept as PNG for the first images (grids)
COLUMNS = ["suite", "dataset", "image_id", "operator", "method", "nfe", "seed", "metric", "value", "seconds",
           "nfe_budget", "nfe_backward", "model", "params", "cell"]


def slug(text: str) -> str:
    """A file-name-safe form of an operator spec or method label (``jpeg:quality=10`` -> ``jpeg_quality_10``)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def method_generators(seed: int, ids, device="cpu") -> list[torch.Generator]:
    """Per-image generators for the restoration method, independent of the measurement's."""
    return make_generators(seed, [f"{i}/restore" for i in ids], device)


@dataclass(frozen=True)
class Cell:
    operator: str  # canonical spec
    method: str  # registered name
    label: str  # name in tables
    model: str | None  # resolved bundled name / path; None for model="none"
    model_sha: str | None
    nfe: int  # budget
    seed: int
    hparams: dict = field(default_factory=dict)
    dataset: str = ""

    @property
    def config(self) -> dict[str, Any]:
        return {"version": RUNNER_VERSION, "dataset": self.dataset, "operator": self.operator, "method": self.method,
                "hparams": self.hparams, "model_sha256": self.model_sha, "nfe": self.nfe, "seed": self.seed}

    @cached_property
    def key(self) -> str:
        return config_hash(self.config)

    def out_dir(self, root: Path) -> Path:
        return root / "outputs" / slug(self.operator) / slug(self.method) / f"nfe{self.nfe}-seed{self.seed}-{self.key[:8]}"

    def describe(self) -> str:
        return f"{self.operator} | {self.label} | nfe {self.nfe} | seed {self.seed}"


# --------------------------------------------------------------------------- planning


def _load_dataset(suite: Suite):
    from benchmarks.datasets import build_dataset

    if not suite.dataset:
        raise ValueError(f"suite {suite.name!r} names no dataset: pass --data PATH")
    return build_dataset(suite.dataset, suite.split)


def _check_model(suite: Suite, entry, method, ref: str | None) -> Path | None:
    """The checkpoint of a method entry (None for model="none" methods), checked against the kind it needs."""
    from restore.engine.checkpoints import read_metadata, resolve_model_path

    if method.model == "none":
        if entry.model is not None:
            raise ValueError(f"method {entry.name!r} needs no model (model='none'); remove model = {entry.model!r}")
        return None
    if ref is None:
        raise ValueError(f"method {entry.name!r} needs a {method.model!r} model: set model = an alias of "
                         f"[models] ({', '.join(suite.models) or 'none'}), a bundled name or a path")
    if not ref:
        raise ValueError(f"suite {suite.name!r}: model alias {entry.model!r} is not set; pass --model {entry.model}=PATH")
    path = resolve_model_path(ref)
    wrapper = read_metadata(path)["wrapper"]
    if wrapper != method.model:
        raise ValueError(f"method {entry.name!r} needs a {method.model!r} model but {ref} is a {wrapper!r} model")
    return path


def resolve_cells(suite: Suite, dataset_name: str) -> list[Cell]:
    """Every cell of ``suite``, in run order (operator, seed, method entry, NFE). Checks method names
    against the registry, model references, the model kind each method needs and that each method
    runs on at least one operator (ValueError listing the valid choices)."""
    from restore.engine.checkpoints import weights_sha256
    from restore.methods import get_method

    ops = {spec: build_operator(spec) for spec in suite.operators}
    shas: dict[str, str] = {}
    runs = []  # (entry, model reference, operator specs it runs on)
    for entry in suite.methods:
        method = get_method(entry.name)
        ref = suite.model_ref(entry)
        path = _check_model(suite, entry, method, ref)
        if path is not None and ref not in shas:
            shas[ref] = weights_sha256(path)
        specs = [s for s in suite.operators
                 if method.supports(ops[s]) and (entry.operators is None or s in entry.operators)]
        if not specs:
            raise ValueError(f"method {entry.name!r} supports none of the suite's operators "
                             f"({', '.join(suite.operators)}); it supports: {', '.join(method.operators)}")
        runs.append((entry, ref, specs))
    return [Cell(spec, entry.name, entry.label, ref, shas.get(ref), nfe, seed, dict(entry.hparams), dataset_name)
            for spec in suite.operators for seed in suite.seeds for entry, ref, specs in runs if spec in specs
            for nfe in entry.nfe]


# --------------------------------------------------------------------------- journal


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (a write killed half-way) so the next append starts on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        start = max(0, f.seek(0, os.SEEK_END) - (1 << 20))  # records are short: the last MiB holds the cut
        f.seek(start)
        tail = f.read()
        if tail.endswith(b"\n"):
            return
        if tail.rfind(b"\n") < 0 and start > 0:
            start, tail = 0, (f.seek(0), f.read())[1]
        f.truncate(start + tail.rfind(b"\n") + 1)


class Journal:
    """One process's append-only record file; every :meth:`commit` is flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        try:  # one writer per journal: a second run on the same folder and rank stops here
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise OSError(f"another run is writing {path}; wait for it or use another --out") from None
        _repair_tail(path)
        self._units = 0
        self._tag = f"{path.stem}-{time.time_ns()}"

    def commit(self, rows: list[dict], done: dict) -> None:
        self._units += 1
        unit = f"{self._tag}-{self._units}"
        lines = [json.dumps({"kind": "row", "unit": unit, **r}) for r in rows]
        lines.append(json.dumps({"kind": "done", "unit": unit, **done}))
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_journals(out: Path) -> tuple[list[dict], list[dict]]:
    """``(rows, done)`` of every journal in ``out/records``: only rows whose unit committed, in file order."""
    rows, done = [], []
    for path in sorted((out / "records").glob("*.jsonl")):
        pending = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn tail of a killed write
                rec = json.loads(line)
                kind = rec.pop("kind")
                if kind == "row":
                    pending.append(rec)
                else:
                    done.append(rec)
                    rows += [r for r in pending if r["unit"] == rec["unit"]]
                    pending = [r for r in pending if r["unit"] != rec["unit"]]
    return rows, done


class Finished:
    """What is finished: per (cell, image) the metrics, method seconds and counted NFE; per cell the set metrics."""

    def __init__(self, done: list[dict]):
        self.images: dict[tuple[str, str], dict] = {}
        self.sets: dict[tuple[str, str], set[str]] = defaultdict(set)  # (cell, set key) -> metrics
        for d in done:
            if d.get("set_key"):
                self.sets[d["cell"], d["set_key"]].update(d["metrics"])
                continue
            for i in d["ids"]:
                rec = self.images.setdefault((d["cell"], i), {"metrics": set()})
                rec["metrics"].update(d["metrics"])
                if "seconds" in d:
                    rec.update(seconds=d["seconds"][i], nfe=d["nfe"], nfe_backward=d["nfe_backward"],
                               params=d.get("params", 0))

    def missing(self, cell: str, image_id: str, metrics) -> set[str] | None:
        """None: the method has not run on the image; else the metrics still to compute."""
        rec = self.images.get((cell, image_id))
        return None if rec is None or "seconds" not in rec else set(metrics) - rec["metrics"]


# --------------------------------------------------------------------------- environment


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """Versions, git commit, device and process layout, written next to every result."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("bcm-restore", "numpy", "pillow", "kornia", "torch-fidelity", "safetensors", "pandas"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    versions.update(torch=torch.__version__, cuda=torch.version.cuda)
    dev = {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    return {"python": sys.version.split()[0], "platform": platform.platform(), "host": platform.node(),
            "versions": versions, "git": git_state(), "device": dev, "torch_threads": torch.get_num_threads(),
            "world_size": world_size, "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# --------------------------------------------------------------------------- the run


@dataclass
class _Context:
    suite: Suite
    out: Path
    dataset: Any
    device: torch.device
    journal: Journal
    finished: Finished
    rank: int
    world_size: int
    grid_ids: set = field(default_factory=set)
    models: dict = field(default_factory=dict)
    method_seconds: float = 0.0
    images_run: int = 0
    failures: list = field(default_factory=list)


def _degraded_dir(ctx: _Context, spec: str, seed: int) -> Path:
    h = config_hash({"dataset": ctx.dataset.name, "operator": spec, "seed": seed})
    return ctx.out / "degraded" / f"{slug(spec)}-seed{seed}-{h[:8]}"


def _measure(ctx: _Context, op, spec: str, seed: int, ids: list[str], x: torch.Tensor):
    """``(op, y)``: the operator drawn for the batch (random boxes) and its measurements, from the cache,
    else made once and cached."""
    from restore.app.io import atomic_write, output_path, write_png

    folder = _degraded_dir(ctx, spec, seed)
    paths = [output_path(folder, i, ".npy") for i in ids]
    gens = make_generators(seed, ids)
    op = op.draw(x.shape, gens, device=x.device)  # the boxes come first from the generators, then the noise
    if all(p.is_file() for p in paths):
        return op, torch.from_numpy(np.stack([np.load(p, allow_pickle=False) for p in paths])).to(ctx.device)
    with torch.no_grad():  # not inference_mode: gradient-based methods take y into autograd
        y = op.measure(x, gens)
    for p, yi in zip(paths, y.cpu().numpy()):
        atomic_write(p, lambda f, yi=yi: np.save(f, yi, allow_pickle=False))
    for k, i in enumerate(ids):
        if i in ctx.grid_ids:
            write_png(_display(y[k:k + 1], x.shape), output_path(folder, i))
            write_png(x[k:k + 1], output_path(ctx.out / "reference", i))
    return op, y


def _display(y: torch.Tensor, shape) -> torch.Tensor:
    """A measurement as an image of the clean size (nearest-neighbour upsampling for low-resolution ones)."""
    if tuple(y.shape[-2:]) == tuple(shape[-2:]):
        return y
    return torch.nn.functional.interpolate(y, size=tuple(shape[-2:]), mode="nearest")


def _model(ctx: _Context, ref: str | None):
    if ref is None:
        return None, 0
    if ref not in ctx.models:
        from restore.engine.checkpoints import load_model
        from restore.engine.networks import count_parameters

        model = load_model(ref, device=ctx.device).requires_grad_(False)
        ctx.models[ref] = (model, count_parameters(model))
    return ctx.models[ref]


def _image_metrics(names, x_hat, x, y, op) -> dict[str, list[float]]:
    from benchmarks.metrics import get_metric

    with torch.inference_mode():
        return {m: get_metric(m)(x_hat=x_hat, x=x, y=y, op=op).tolist() for m in names}


def _rows(ctx: _Context, cell: Cell, ids, values: dict, seconds: dict, nfe: dict, params: int) -> list[dict]:
    base = {"suite": ctx.suite.name, "dataset": cell.dataset, "operator": cell.operator, "method": cell.label,
            "seed": cell.seed, "nfe_budget": cell.nfe, "model": cell.model or "", "params": params, "cell": cell.key}
    return [{**base, "image_id": i, "metric": m, "value": float(v[k]), "seconds": seconds[i],
             "nfe": nfe[i][0], "nfe_backward": nfe[i][1]} for m, v in values.items() for k, i in enumerate(ids)]


def _commit(ctx: _Context, cell: Cell, ids, values: dict, seconds: dict, nfe: dict, params: int) -> None:
    """Journal one batch of per-image results and its ``done`` mark (counted NFE of the batch's first image)."""
    first = nfe[ids[0]]
    ctx.journal.commit(_rows(ctx, cell, ids, values, seconds, nfe, params),
                       {"cell": cell.key, "ids": ids, "metrics": list(values), "seconds": seconds,
                        "nfe": first[0], "nfe_backward": first[1], "params": params})


def _run_batch(ctx: _Context, cell: Cell, method, op, ids: list[str], x: torch.Tensor, y: torch.Tensor) -> None:
    from restore.app.io import output_path, write_png

    model, params = _model(ctx, cell.model)
    gens = method_generators(cell.seed, ids, ctx.device)
    counting = model.counter.counting() if model is not None else nullcontext(None)
    grad = torch.enable_grad() if method.needs_grad else torch.inference_mode()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    start = time.perf_counter()
    with grad, counting as tally:
        x_hat = method(model, y, op, nfe=cell.nfe, generator=gens, **cell.hparams)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    elapsed = time.perf_counter() - start
    x_hat = x_hat.detach()
    if x_hat.shape != x.shape:
        raise ValueError(f"{cell.describe()}: method returned shape {tuple(x_hat.shape)}, expected {tuple(x.shape)}")
    folder = cell.out_dir(ctx.out)
    for k, i in enumerate(ids):
        write_png(x_hat[k:k + 1], output_path(folder, i))
    per_image = elapsed / len(ids)
    counted = (tally.forward, tally.backward) if tally is not None else (0, 0)
    seconds, nfe = {i: per_image for i in ids}, {i: counted for i in ids}
    _commit(ctx, cell, ids, _image_metrics(ctx.suite.image_metrics, x_hat, x, y, op), seconds, nfe, params)
    ctx.method_seconds += elapsed
    ctx.images_run += len(ids)


def _rescore(ctx: _Context, cell: Cell, op, ids, x, y, metrics: set[str]) -> None:
    """Metrics added to a suite after the method ran: computed from the saved restorations."""
    from restore.app.io import output_path, read_image

    x_hat = torch.stack([read_image(output_path(cell.out_dir(ctx.out), i)) for i in ids]).to(ctx.device)
    recs = [ctx.finished.images[cell.key, i] for i in ids]
    seconds = {i: r["seconds"] for i, r in zip(ids, recs)}
    nfe = {i: (r["nfe"], r["nfe_backward"]) for i, r in zip(ids, recs)}
    _commit(ctx, cell, ids, _image_metrics(sorted(metrics), x_hat, x, y, op), seconds, nfe, recs[0]["params"])


def _batches(ctx: _Context, indices: list[int]) -> list[list[int]]:
    from restore.app.io import group_by_size

    groups = group_by_size([ctx.dataset.image_size(i) for i in indices], ctx.suite.batch_size)
    return [[indices[j] for j in g] for g in groups]


def _run_cells(ctx: _Context, cells: list[Cell], indices: list[int], bar) -> None:
    from restore.app.io import output_path
    from restore.methods import get_method

    ids_of = {i: ctx.dataset.image_id(i) for i in indices}
    metrics = ctx.suite.image_metrics
    for cell in cells:
        method, op = get_method(cell.method), build_operator(cell.operator)
        status = {i: ctx.finished.missing(cell.key, ids_of[i], metrics) for i in indices}
        folder = cell.out_dir(ctx.out)
        for i in indices:  # metrics come from the saved restoration: run again if it is gone
            if status[i] and not output_path(folder, ids_of[i]).is_file():
                status[i] = None
        to_run = [i for i in indices if status[i] is None]
        to_rescore = [i for i in indices if status[i]]
        bar.start_cell(cell, len(to_run) + len(to_rescore))
        try:
            batches = [(b, False) for b in _batches(ctx, to_run)] + [(b, True) for b in _batches(ctx, to_rescore)]
            for batch, rescore in batches:
                ids, x = ctx.dataset.get_batch(batch)
                x = x.to(ctx.device)
                batch_op, y = _measure(ctx, op, cell.operator, cell.seed, ids, x)
                if rescore:
                    _rescore(ctx, cell, batch_op, ids, x, y, set().union(*(status[i] for i in batch)))
                else:
                    _run_batch(ctx, cell, method, batch_op, ids, x, y)
                bar.advance(len(ids))
        except Exception as e:  # one broken cell must not stop the others; reported at the end
            ctx.failures.append(f"{cell.describe()}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            bar.note(f"[red]failed[/red] {escape(ctx.failures[-1])}")


def _reference_key(ctx: _Context) -> str:
    """Cached Inception features of the suite's FID reference set (computed once, then read from the cache)."""
    from benchmarks.datasets import DATASETS, build_dataset
    from benchmarks.fid import cached_features
    from operators.utils import to_uint8

    ref = ctx.suite.fid
    name = ref.dataset or ctx.suite.dataset
    split = ref.split or (("train" if "train" in DATASETS[name][1] else None) if name in DATASETS else None)
    ds = build_dataset(name, split)
    n = min(ref.images or len(ds), len(ds))
    images = torch.cat([to_uint8(x) for _, x in ds.batches(1000, range(n))])
    return cached_features(images, device=ctx.device)[0]


def _set_key(suite: Suite, ids: list[str]) -> str:
    """Identity of a cell's image set and FID reference: set metrics are recomputed when either changes."""
    return config_hash({"ids": ids, "reference": suite.fid.__dict__, "dataset": suite.dataset})


def _set_metrics(ctx: _Context, cells: list[Cell], indices: list[int], bar) -> None:
    """FID / KID per cell from the saved PNGs of every image (all ranks), against the reference set."""
    from benchmarks.fid import compute_fid_kid
    from restore.app.io import output_path, read_image_uint8

    wanted = ctx.suite.set_metrics
    if not wanted:
        return
    ids = [ctx.dataset.image_id(i) for i in indices]
    set_key = _set_key(ctx.suite, ids)
    ref_key = None
    for cell in cells:
        if set(wanted) <= ctx.finished.sets.get((cell.key, set_key), set()):
            continue
        if any(ctx.finished.missing(cell.key, i, ()) is None for i in ids):
            ctx.failures.append(f"{cell.describe()}: FID/KID skipped, not every image was restored")
            continue
        ref_key = ref_key or _reference_key(ctx)
        bar.note(f"FID/KID {escape(cell.describe())}")
        start = time.perf_counter()
        u8 = np.stack([read_image_uint8(output_path(cell.out_dir(ctx.out), i)) for i in ids])
        scores = compute_fid_kid(u8, ref_key, device=ctx.device)
        seconds = time.perf_counter() - start
        recs = [ctx.finished.images[cell.key, i] for i in ids]
        nfe = (float(np.mean([r["nfe"] for r in recs])), float(np.mean([r["nfe_backward"] for r in recs])))
        values = {m: [scores[m]] for m in wanted}
        rows = _rows(ctx, cell, ["*"], values, {"*": seconds}, {"*": nfe}, recs[0]["params"])
        for r in rows:
            r.update(set_key=set_key, n=scores["n"], n_reference=scores["n_reference"], reference=scores["reference_key"])
        ctx.journal.commit(rows, {"cell": cell.key, "ids": ["*"], "metrics": list(wanted), "set_key": set_key})


def results_frame(out: str | os.PathLike, cells: list[Cell] | None = None, suite: Suite | None = None,
                  ids: list[str] | None = None):
    """The long results table of an output folder (pandas DataFrame, :data:`COLUMNS` first).

    Merges every journal; the last committed value of each (cell, image, metric) wins. With ``cells``
    only those cells are kept and their labels are taken from them; with ``suite`` and ``ids`` (the
    current images) only those images and the set metrics computed on exactly them.
    """
    import pandas as pd

    out = Path(out)
    rows, _ = read_journals(out)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    if "set_key" not in frame:
        frame["set_key"] = None
    frame = frame.drop_duplicates(subset=["cell", "image_id", "metric", "set_key"], keep="last")
    if suite is not None and ids is not None:
        frame = frame.assign(suite=suite.name)
        keep = frame.image_id.isin(ids) | ((frame.image_id == "*") & (frame.set_key == _set_key(suite, ids)))
        frame = frame[keep]
    if cells is not None:
        label = {c.key: c.label for c in cells}
        order = {c.key: k for k, c in enumerate(cells)}
        frame = frame[frame.cell.isin(label)].assign(method=lambda f: f.cell.map(label))
        frame = frame.sort_values(by=["cell", "image_id"], key=lambda s: s.map(order) if s.name == "cell" else s,
                                  kind="stable")
    extra = [c for c in frame.columns if c not in COLUMNS and c not in ("unit", "set_key")]
    return frame[COLUMNS + extra].reset_index(drop=True)


class _Bar:
    """Progress on stderr: rich bars for the current cell and the whole run (images, images/s, ETA) on a
    terminal; one line per finished cell otherwise (log files of batch jobs)."""

    def __init__(self, enabled: bool, total: int):
        from rich.console import Console

        self.console = Console(stderr=True) if enabled else None
        self.progress = self.cell = None
        self.total, self.finished, self.skipped, self.started = total, 0, 0, time.perf_counter()
        self.line = None  # (description, images, start) of the current cell, for the plain log
        if self.console is not None and self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console)
            self.progress.start()
            self.all = self.progress.add_task("all cells", total=total, rate="")

    def _log_cell(self) -> None:
        if self.progress is None and self.console is not None and self.line and self.line[1]:
            desc, n, start = self.line
            dt = time.perf_counter() - start
            rate = (self.finished - self.skipped) / (time.perf_counter() - self.started)
            eta = (self.total - self.finished) / rate if rate else float("nan")
            self.console.print(f"{desc}: {n} images in {dt:.1f} s ({n / dt:.2f} img/s); "
                               f"run {self.finished}/{self.total}, ETA {eta:.0f} s", highlight=False, soft_wrap=True)

    def start_cell(self, cell: Cell, n: int) -> None:
        self._log_cell()
        self.line = (cell.describe(), n, time.perf_counter())
        if self.progress is not None:
            if self.cell is not None:
                self.progress.remove_task(self.cell)
            self.cell = self.progress.add_task(cell.describe(), total=n, rate="")

    def advance(self, n: int) -> None:
        self.finished += n
        if self.progress is None:
            return
        for task in (self.cell, self.all):
            self.progress.advance(task, n)
            speed = self.progress.tasks[self.progress.task_ids.index(task)].speed
            self.progress.update(task, rate=f"{speed:.2f} img/s" if speed else "")

    def skip(self, n: int) -> None:
        """Count ``n`` images finished by earlier runs (not in the rate)."""
        self.finished = self.skipped = n
        if self.progress is not None:
            self.progress.update(self.all, completed=n)

    def note(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, soft_wrap=True)

    def stop(self) -> None:
        self._log_cell()
        self.line = None
        if self.progress is not None:
            self.progress.stop()


def _distributed(device: str | None) -> tuple[int, int, torch.device]:
    """Rank, world size and device; initialises torch.distributed under torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world > 1:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, dev


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def run_suite(suite: Suite, out: str | os.PathLike, *, limit: int | None = None, device: str | None = None,
              progress: bool = True, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Run (or resume) ``suite`` into folder ``out``; returns a summary (cells, images, timings, failures).

    ``shard=(rank, world_size)`` runs one shard without torch.distributed (the journals merge the
    same way); by default the shard comes from torchrun's environment. Only rank 0 computes set
    metrics and writes ``results.csv`` and ``run.json``.
    """
    wall = time.perf_counter()
    if shard is None:
        rank, world, dev = _distributed(device)
    else:
        (rank, world), dev = shard, torch.device(device or "cpu")
    dataset = _load_dataset(suite)
    cells = resolve_cells(suite, dataset.name)  # every configuration error before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = min(len(dataset), suite.images or len(dataset), limit or len(dataset))
    indices = list(range(n))
    ids = [dataset.image_id(i) for i in indices]
    mine = indices[rank::world]
    _, done = read_journals(out)
    ctx = _Context(suite, out, dataset, dev, Journal(out / "records" / f"rank{rank}.jsonl"), Finished(done), rank, world,
                   grid_ids=set(ids[:GRID_IMAGES]))
    bar = _Bar(progress, len(cells) * len(mine))
    try:
        bar.skip(sum(ctx.finished.missing(c.key, ids[i], suite.image_metrics) == set() for c in cells for i in mine))
        _run_cells(ctx, cells, mine, bar)
        _barrier(world)
        if rank == 0:
            ctx.finished = Finished(read_journals(out)[1])  # every rank's work
            _set_metrics(ctx, cells, indices, bar)
    finally:
        bar.stop()
        ctx.journal.close()
    summary = {"suite": suite.name, "out": str(out), "cells": len(cells), "images": n, "rank": rank,
               "world_size": world, "images_restored": ctx.images_run, "method_seconds": round(ctx.method_seconds, 3),
               "wall_seconds": round(time.perf_counter() - wall, 3), "failures": ctx.failures}
    if rank == 0:
        from benchmarks.fairness import fairness_report
        from restore.app.io import write_csv_atomic, write_text_atomic

        frame = results_frame(out, cells, suite, ids)
        write_csv_atomic(frame, out / "results.csv")
        summary["rows"] = len(frame)
        models = fairness_report(suite.model_refs)
        summary["fairness_violations"] = models["violations"]
        record = {
            "suite": suite.to_dict(), "images": n, "limit": limit, "environment": environment(dev, world),
            "models": models, "summary": summary, "grid_ids": ids[:GRID_IMAGES],
            "cells": [{"key": c.key, "label": c.label, "dir": str(c.out_dir(out).relative_to(out)), **c.config,
                       "model": c.model} for c in cells],
            "degraded": {spec: {seed: str(_degraded_dir(ctx, spec, seed).relative_to(out)) for seed in suite.seeds}
                         for spec in suite.operators},
        }
        write_text_atomic(json.dumps(record, indent=1, default=str) + "\n", out / "run.json")
        with open(out / "runs.jsonl", "a", encoding="utf-8") as f:  # every session that added results
            f.write(json.dumps({"environment": record["environment"], "summary": summary}, default=str) + "\n")
    return summary
