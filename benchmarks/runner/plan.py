"""Stage 1, planning: from a suite to the cells to run and the images to run them on.

Input: a :class:`benchmarks.suites.Suite`, an image limit and this process's shard ``(rank, world)``.
Output: a frozen :class:`Plan` holding the built dataset, the :class:`Cell` values in run order, the
image indices and ids of the run (and of this shard), the ids whose degraded input and ground truth
are kept as PNG for grids, and the key of the image set that set metrics (FID / KID) are tied to.

Every configuration error (unknown method, missing or wrong kind of model, a method that supports
none of the suite's operators, class labels that do not fit the models or the dataset) is raised here,
before anything is written. A cell passes the dataset's class labels to its method exactly when its model is
class-conditional (``Cell.class_labels``; the suite's ``class_labels`` key only requires or forbids it).

A cell's key hashes its resolved configuration -- dataset, operator spec, method, hyper-parameters, the
model's *weights* hash (card edits do not count), NFE budget, seed and :data:`RUNNER_VERSION` -- and nothing
else, so editing a suite reruns exactly the cells whose configuration changed, while labels, batch size and
the metric list never invalidate results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from benchmarks.suites import Suite, config_hash
from operators import build_operator

RUNNER_VERSION = 1  # part of every cell key: bump when the runner's numbers change meaning
GRID_IMAGES = 8  # degraded input and ground truth are kept as PNG for the first images (grids)


def slug(text: str) -> str:
    """A file-name-safe form of an operator spec or method label (``jpeg:quality=10`` -> ``jpeg_quality_10``)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


@dataclass(frozen=True)
class Cell:
    """One operator x method entry x NFE budget x seed, fully resolved."""

    operator: str  # canonical spec
    method: str  # registered name
    label: str  # name in tables
    model: str | None  # resolved bundled name / path; None for model="none"
    model_sha: str | None
    nfe: int  # budget
    seed: int
    hparams: dict = field(default_factory=dict)
    dataset: str = ""
    # The method gets the batch's dataset labels: the model is class-conditional. Not in the key: it follows
    # from the model (weights hash) and the labels from the dataset.
    class_labels: bool = False

    @property
    def config(self) -> dict[str, Any]:
        return {"version": RUNNER_VERSION, "dataset": self.dataset, "operator": self.operator, "method": self.method,
                "hparams": self.hparams, "model_sha256": self.model_sha, "nfe": self.nfe, "seed": self.seed}

    @cached_property
    def key(self) -> str:
        return config_hash(self.config)

    def out_dir(self, root: Path) -> Path:
        """Where the cell's restorations go under the output folder ``root``."""
        name = f"nfe{self.nfe}-seed{self.seed}-{self.key[:8]}"
        return root / "outputs" / slug(self.operator) / slug(self.method) / name

    def describe(self) -> str:
        return f"{self.operator} | {self.label} | nfe {self.nfe} | seed {self.seed}"


def load_dataset(suite: Suite):
    """The suite's dataset (:func:`restore.datasets.build_dataset`)."""
    from restore.datasets import build_dataset

    if not suite.dataset:
        raise ValueError(f"suite {suite.name!r} names no dataset: pass --data PATH")
    return build_dataset(suite.dataset, suite.split)


def _model_classes(path: Path | None) -> int:
    """``num_classes`` of a checkpoint's network, from its metadata (0: unconditional, or no model)."""
    from restore.engine.checkpoints import read_metadata

    return int(read_metadata(path)["unet"].get("num_classes", 0) or 0) if path is not None else 0


def _check_labels(suite: Suite, entry, ref: str | None, classes: int) -> None:
    """A method entry's model against the suite's ``class_labels`` setting (benchmarks.suites)."""
    if suite.class_labels is False and classes:
        raise ValueError(f"suite {suite.name!r} sets class_labels = false but {ref} (method {entry.name!r}) is "
                         f"class-conditional ({classes} classes); drop the setting or use an unconditional model")
    if suite.class_labels is True and ref is not None and not classes:
        raise ValueError(f"suite {suite.name!r} sets class_labels = true but {ref} (method {entry.name!r}) is "
                         "unconditional; drop the setting or use a class-conditional model")


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
        raise ValueError(f"suite {suite.name!r}: model alias {entry.model!r} is not set; "
                         f"pass --model {entry.model}=PATH")
    path = resolve_model_path(ref)
    from restore.engine.wrappers import serves

    wrapper = read_metadata(path)["wrapper"]
    if not serves(wrapper, method.model):  # e.g. a "vp-eps" checkpoint serves the "edm" methods
        raise ValueError(f"method {entry.name!r} needs a {method.model!r} model but {ref} is a {wrapper!r} model")
    return path


def resolve_cells(suite: Suite, dataset_name: str) -> list[Cell]:
    """Every cell of ``suite``, in run order (operator, seed, NFE budget, method entry): each method's cheap
    budgets run before anyone's expensive ones, so a long run stopped early already compares every method at low
    NFE (tables list a method's budgets together whatever the run order). Checks method names
    against the registry, model references, the model kind each method needs and that each method
    runs on at least one operator (ValueError listing the valid choices)."""
    from restore.engine.checkpoints import weights_sha256
    from restore.methods import get_method

    ops = {spec: build_operator(spec) for spec in suite.operators}
    shas: dict[str, str] = {}
    runs = []  # (entry, model reference, operator specs it runs on, whether it is class-conditional)
    for entry in suite.methods:
        method = get_method(entry.name)
        ref = suite.model_ref(entry)
        path = _check_model(suite, entry, method, ref)
        classes = _model_classes(path)
        _check_labels(suite, entry, ref, classes)
        if path is not None and ref not in shas:
            shas[ref] = weights_sha256(path)
        specs = [s for s in suite.operators
                 if method.supports(ops[s]) and (entry.operators is None or s in entry.operators)]
        if not specs:
            raise ValueError(f"method {entry.name!r} supports none of the suite's operators "
                             f"({', '.join(suite.operators)}); it supports: {', '.join(method.operators)}")
        runs.append((entry, ref, specs, classes > 0))
    cells = [Cell(spec, entry.name, entry.label, ref, shas.get(ref), nfe, seed, dict(entry.hparams), dataset_name,
                  conditional)
             for spec in suite.operators for seed in suite.seeds for entry, ref, specs, conditional in runs
             if spec in specs for nfe in entry.nfe]
    return sorted(cells, key=lambda c: (suite.operators.index(c.operator), suite.seeds.index(c.seed), c.nfe))


def _check_dataset_labels(suite: Suite, dataset, cells: list[Cell]) -> None:
    """The dataset has the labels its class-conditional models need, numbering as many classes as each model has
    (when the dataset names its classes: CIFAR-10 labels cannot condition an ImageNet model)."""
    from restore.engine.checkpoints import resolve_model_path

    if dataset.labels is None and (suite.class_labels or any(c.class_labels for c in cells)):
        needs = next((c.model for c in cells if c.class_labels), None)
        raise ValueError(f"suite {suite.name!r}: {f'{needs} is class-conditional but ' if needs else ''}dataset "
                         f"{dataset.name!r} has no class labels (a folder needs labels.csv with columns file,label)")
    for ref in dict.fromkeys(c.model for c in cells if c.class_labels):
        classes = _model_classes(resolve_model_path(ref))
        if dataset.classes is not None and len(dataset.classes) != classes:
            raise ValueError(f"suite {suite.name!r}: {ref} has {classes} classes but the labels of dataset "
                             f"{dataset.name!r} number {len(dataset.classes)}")


def set_key(suite: Suite, ids: list[str]) -> str:
    """Identity of a cell's image set and FID reference: set metrics are recomputed when either changes."""
    return config_hash({"ids": ids, "reference": suite.fid.__dict__, "dataset": suite.dataset})


@dataclass(frozen=True)
class Plan:
    """What one process of a run does: the suite, its dataset and cells, and the images (all and this shard's)."""

    suite: Suite
    dataset: Any  # a restore.datasets dataset
    cells: tuple[Cell, ...]
    indices: tuple[int, ...]  # dataset indices of every image of the run
    ids: tuple[str, ...]  # their image ids
    rank: int = 0
    world_size: int = 1
    image_set_key: str = ""  # set_key(suite, ids)
    tuning_mismatches: tuple[str, ...] = ()  # see tuning_mismatches

    @property
    def mine(self) -> list[int]:
        """The indices this shard restores: images rank, rank + W, ... (strided)."""
        return list(self.indices[self.rank::self.world_size])

    @property
    def grid_ids(self) -> frozenset[str]:
        """Images whose degraded input and ground truth are also saved as PNG."""
        return frozenset(self.ids[:GRID_IMAGES])


def make_plan(suite: Suite, limit: int | None = None, rank: int = 0, world_size: int = 1) -> Plan:
    """Load the dataset, resolve and check every cell, and pick ``min(suite.images, limit)`` images from
    ``suite.start`` on."""
    dataset = load_dataset(suite)
    cells = resolve_cells(suite, dataset.name)
    _check_dataset_labels(suite, dataset, cells)
    if suite.start >= len(dataset):
        raise ValueError(f"suite {suite.name!r}: start {suite.start} is past the {len(dataset)} images of the data")
    left = len(dataset) - suite.start
    n = min(left, suite.images or left, limit or left)
    indices = tuple(range(suite.start, suite.start + n))
    ids = tuple(dataset.image_id(i) for i in indices)
    return Plan(suite, dataset, tuple(cells), indices, ids, rank, world_size, set_key(suite, list(ids)),
                tuning_mismatches(suite, cells))


def tuning_mismatches(suite: Suite, cells: list[Cell]) -> tuple[str, ...]:
    """One line per model alias whose weights differ from those ``restore-bench tune`` chose the suite's values on
    (``[tuning.models]``: alias -> weights sha256): tuned hyper-parameters are specific to the model."""
    shas = {c.model: c.model_sha for c in cells}
    out = []
    for alias, tuned_sha in suite.tuning.get("models", {}).items():
        ref = suite.models.get(alias)
        sha = shas.get(ref)
        if sha is not None and sha != tuned_sha:
            out.append(f"suite {suite.name!r} was tuned on other weights for model {alias!r} (sha256 "
                       f"{tuned_sha[:12]}...) than {ref} ({sha[:12]}...): its tuned values may not fit")
    return tuple(out)
