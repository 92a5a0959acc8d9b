"""Benchmark suites: what to run, as TOML files (docs/design.md#benchmarks).

A suite names a dataset, the images to use, the degradation operators, the methods with their models,
NFE budgets and hyper-parameters, the metrics, the seeds and the batch size::

    description = "JPEG restoration on CIFAR-10"
    dataset = "cifar10"          # restore.datasets name, or a path (relative to this file if it exists there)
    split = "test"
    images = 1000                # the first N images of the split (omit: all)
    # start = 1000               # skip the first N images (a held-out range; restore-bench tune uses it)
    operators = ["jpeg:quality=10", "jpeg:quality=20"]
    metrics = ["psnr", "ssim", "cpsnr", "fid", "kid"]
    seeds = [0]
    batch_size = 100
    # class_labels = true        # see below; omit for the default

    [models]                     # aliases; `restore-bench run ... --model bcm=PATH` overrides one
    bcm = "bcm-cifar10"          # bundled name, or a path (as for dataset)

    [fid]                        # reference set of FID / KID (only read when those metrics are asked for)
    split = "train"              # a split of `dataset`, or `dataset = PATH`
    images = 10000

    [[methods]]
    name = "bcm-jpeg"            # a registered method (restore.methods)
    model = "bcm"                # an alias of [models], a bundled name or a path; omitted for model="none"
    nfe = [1, 2, 3, 4]
    hparams = { }                # keyword arguments of the method
    # label = "bcm-jpeg-s0.1"    # name in tables (default: name); needed to run one method twice on an operator
    # operators = ["jpeg:quality=10"]   # a subset of the suite's (default: all the method supports)

    [tuning]                     # written by `restore-bench tune`: the provenance of tuned hparams (recorded)

A label may appear in several entries when they cover different (operator, NFE) cells (a tuned suite gives every
tuned cell its own entry).

Class labels: by default the dataset's labels go to the methods of class-conditional models (``num_classes > 0``)
and unconditional models get none. ``class_labels = true`` requires it: the dataset must have labels and every
model of the suite must be class-conditional; ``class_labels = false`` never passes labels, so a class-conditional
model is an error. Both are checked when the suite is resolved, before anything runs.

A cell is operator x method entry x NFE x seed; a method runs only on the suite operators it
supports (``Method.supports``). Unknown keys are errors that list the valid keys. Operator and metric
names are checked when the suite is loaded; method names and models when it is resolved for a run
(:func:`resolve_cells`), because methods register themselves as their modules are imported.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from benchmarks.metrics import METRICS
from operators import build_operator

SUITE_KEYS = {
    "name": "suite name (default: the file name)",
    "description": "one line shown by `restore-bench list`",
    "dataset": "restore.datasets name (cifar10, tinyimagenet) or a path",
    "split": "split of a named dataset",
    "images": "number of images, the first N of the split (after 'start'; default: all)",
    "start": "index of the first image (default 0): a held-out range after the evaluation images",
    "tuning": "[tuning] table: provenance of tuned hyper-parameters (written by restore-bench tune)",
    "operators": "operator specs, e.g. 'jpeg:quality=10'",
    "methods": "[[methods]] tables",
    "metrics": f"metric names ({', '.join(METRICS)})",
    "seeds": "run seeds (per-image seeds derive from seed and image id)",
    "batch_size": "images per method call",
    "models": "[models] table: alias -> bundled model name or checkpoint path",
    "fid": "[fid] table: the FID / KID reference set",
    "class_labels": "true: every model is class-conditional and gets the dataset's labels; false: no labels "
                    "(default: labels go to the class-conditional models)",
}
METHOD_KEYS = {
    "name": "registered method name",
    "label": "name in result tables (default: name)",
    "model": "alias from [models], bundled model name or checkpoint path (omit for model='none' methods)",
    "nfe": "list of NFE budgets",
    "hparams": "table of keyword arguments for the method",
    "operators": "only these of the suite's operators (default: every one the method supports)",
}
FID_KEYS = {
    "dataset": "reference dataset name or path (default: the suite's dataset)",
    "split": "reference split (default: train for named datasets with one)",
    "images": "number of reference images, the first N (default: all)",
}


def _check_keys(table: dict, valid: dict, where: str) -> None:
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")


def _typed(value: Any, kind: type | tuple, where: str, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{where}: {what} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _int_list(value: Any, where: str, what: str, low: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(type(v) is int and v >= low for v in value):
        raise ValueError(f"{where}: {what} must be a non-empty list of integers >= {low}, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: {what} has duplicates: {value!r}")
    return tuple(value)


def _int(value: Any, where: str, what: str, low: int) -> int:
    if type(value) is not int or value < low:
        raise ValueError(f"{where}: {what} must be an integer >= {low}, got {value!r}")
    return value


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: Any, length: int = 16) -> str:
    """Stable hash of a JSON-able config (keys sorted): the identity of a cell, a cache entry, ..."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class MethodEntry:
    """One ``[[methods]]`` table: a method, its model reference, NFE budgets and hyper-parameters."""

    name: str
    nfe: tuple[int, ...]
    model: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    operators: tuple[str, ...] | None = None  # canonical specs; None: all the suite's

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "model": self.model, "nfe": list(self.nfe),
                "hparams": dict(self.hparams), "operators": None if self.operators is None else list(self.operators)}


@dataclass(frozen=True)
class FidReference:
    dataset: str | None = None
    split: str | None = None
    images: int | None = None


@dataclass(frozen=True)
class Suite:
    """A parsed suite (see the module docstring). Paths in it are already resolved against its file."""

    name: str
    dataset: str
    operators: tuple[str, ...]
    methods: tuple[MethodEntry, ...]
    metrics: tuple[str, ...] = ("psnr", "ssim", "cpsnr")
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 16
    split: str | None = None
    images: int | None = None
    start: int = 0
    models: dict[str, str] = field(default_factory=dict)
    fid: FidReference = FidReference()
    description: str = ""
    source: str = ""  # file it came from
    tuning: dict[str, Any] = field(default_factory=dict)  # restore-bench tune's record, when the values are tuned
    class_labels: bool | None = None  # None: labels for class-conditional models only (module docstring)

    def model_ref(self, entry: MethodEntry) -> str | None:
        """The checkpoint reference (bundled name or path) of a method entry: its alias resolved, or None."""
        return None if entry.model is None else self.models.get(entry.model, entry.model)

    @property
    def model_refs(self) -> list[str]:
        """The checkpoints the suite's methods use, in order of first use (unset aliases left out)."""
        return list(dict.fromkeys(r for r in map(self.model_ref, self.methods) if r))

    @property
    def set_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if not METRICS[m].per_image)

    @property
    def image_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if METRICS[m].per_image)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "source": self.source, "dataset": self.dataset,
            "split": self.split, "images": self.images, "start": self.start, "operators": list(self.operators),
            "methods": [m.to_dict() for m in self.methods], "metrics": list(self.metrics), "seeds": list(self.seeds),
            "batch_size": self.batch_size, "models": dict(self.models),
            "fid": {"dataset": self.fid.dataset, "split": self.fid.split, "images": self.fid.images},
            "tuning": self.tuning, **({"class_labels": self.class_labels} if self.class_labels is not None else {}),
        }

    def with_models(self, overrides: dict[str, str]) -> Suite:
        """The suite with model aliases replaced (``--model ALIAS=PATH``); unknown aliases are errors."""
        unknown = sorted(set(overrides) - set(self.models))
        if unknown:
            raise ValueError(f"suite {self.name!r}: no model alias {', '.join(unknown)}; "
                             f"its aliases: {', '.join(self.models) or '(none)'}")
        return replace(self, models={**self.models, **overrides})

    def with_dataset(self, dataset: str) -> Suite:
        """The suite on another dataset (``--data PATH``): a folder or file holds one split."""
        return replace(self, dataset=dataset, split=None)


def _resolve_path(value: str, base: Path | None, names) -> str:
    """A relative path that exists next to the suite file becomes absolute; names (bundled models,
    datasets) and anything else stay as written."""
    if value in names or base is None or not value or Path(value).is_absolute() or not (base / value).exists():
        return value
    return str((base / value).resolve())


def parse_suite(data: dict[str, Any], name: str, base: Path | None = None, source: str = "") -> Suite:
    """Validate a suite table (as read from TOML) into a :class:`Suite`; ValueError says what is wrong."""
    from restore.datasets import DATASETS
    from restore.engine.checkpoints import BUNDLED_MODELS

    where = f"suite {name!r}"
    _check_keys(data, SUITE_KEYS, where)
    for key in ("dataset", "operators", "methods"):
        if key not in data:
            raise ValueError(f"{where}: missing required key {key!r}")
    dataset = _resolve_path(_typed(data["dataset"], str, where, "dataset"), base, DATASETS)
    operators = data["operators"]
    if not isinstance(operators, list) or not operators or not all(isinstance(s, str) for s in operators):
        raise ValueError(f"{where}: operators must be a non-empty list of spec strings, got {operators!r}")
    specs = []
    for spec in operators:
        try:
            specs.append(build_operator(spec).spec)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if len(set(specs)) != len(specs):
        raise ValueError(f"{where}: operators has duplicates: {specs}")
    metrics = data.get("metrics", list(Suite.metrics))
    if not isinstance(metrics, list) or not metrics:
        raise ValueError(f"{where}: metrics must be a non-empty list of names ({', '.join(METRICS)})")
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"{where}: unknown metric {m!r}; valid: {', '.join(METRICS)}")
    models = data.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
        raise ValueError(f"{where}: [models] must map aliases to model names or paths")
    models = {k: _resolve_path(v, base, BUNDLED_MODELS) for k, v in models.items()}
    methods = data["methods"]
    if not isinstance(methods, list) or not methods:
        raise ValueError(f"{where}: methods must be a non-empty list of [[methods]] tables")
    entries = [_parse_method(m, i, where, models, base, BUNDLED_MODELS, specs) for i, m in enumerate(methods)]
    seen, dup = set(), set()  # a label names one entry per operator and NFE (e.g. one model per operator)
    for e in entries:
        for spec in e.operators or specs:
            for nfe in e.nfe:
                (dup if (e.label, spec, nfe) in seen else seen).add((e.label, spec, nfe))
    if dup:
        raise ValueError(f"{where}: method label(s) {', '.join(sorted({label for label, *_ in dup}))} used twice on "
                         "one operator and NFE; give each entry a distinct 'label'")
    fid = data.get("fid", {})
    _check_keys(_typed(fid, dict, where, "[fid]"), FID_KEYS, f"{where} [fid]")
    ref = FidReference(
        dataset=(_resolve_path(_typed(fid["dataset"], str, where, "fid.dataset"), base, DATASETS)
                 if "dataset" in fid else None),
        split=_typed(fid["split"], str, where, "fid.split") if "split" in fid else None,
        images=_int(fid["images"], where, "fid.images", 2) if "images" in fid else None,
    )
    return Suite(
        name=_typed(data.get("name", name), str, where, "name"),
        description=_typed(data.get("description", ""), str, where, "description"),
        dataset=dataset,
        split=_typed(data["split"], str, where, "split") if "split" in data else None,
        images=_int(data["images"], where, "images", 1) if "images" in data else None,
        start=_int(data.get("start", 0), where, "start", 0),
        tuning=dict(_typed(data.get("tuning", {}), dict, where, "[tuning]")),
        class_labels=_typed(data["class_labels"], bool, where, "class_labels") if "class_labels" in data else None,
        operators=tuple(specs),
        methods=tuple(entries),
        metrics=tuple(metrics),
        seeds=_int_list(data.get("seeds", [0]), where, "seeds", 0),
        batch_size=_int(data.get("batch_size", Suite.batch_size), where, "batch_size", 1),
        models=models,
        fid=ref,
        source=source,
    )


def _parse_method(table: Any, index: int, where: str, models: dict, base: Path | None, bundled,
                  suite_ops: list[str]) -> MethodEntry:
    where = f"{where} methods[{index}]"
    _typed(table, dict, where, "a method entry")
    _check_keys(table, METHOD_KEYS, where)
    if "name" not in table or "nfe" not in table:
        raise ValueError(f"{where}: 'name' and 'nfe' are required")
    name = _typed(table["name"], str, where, "name")
    model = table.get("model")
    if model is not None:
        model = _typed(model, str, where, "model")
        if model not in models:
            model = _resolve_path(model, base, bundled)
    ops = table.get("operators")
    if ops is not None:
        if not isinstance(ops, list) or not ops or not all(isinstance(o, str) for o in ops):
            raise ValueError(f"{where}: operators must be a non-empty list of spec strings, got {ops!r}")
        try:
            ops = tuple(build_operator(o).spec for o in ops)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        outside = [o for o in ops if o not in suite_ops]
        if outside:
            raise ValueError(f"{where}: operators {', '.join(outside)} are not in the suite; "
                             f"its operators: {', '.join(suite_ops)}")
    return MethodEntry(
        operators=ops,
        name=name,
        label=_typed(table.get("label", name), str, where, "label"),
        model=model,
        nfe=_int_list(table["nfe"], where, "nfe", 0),
        hparams=dict(_typed(table.get("hparams", {}), dict, where, "hparams")),
    )


# --------------------------------------------------------------------------- loading


def builtin_dir() -> Path:
    return Path(str(resources.files("benchmarks") / "suites"))


def builtin_suites() -> dict[str, Path]:
    """Built-in suite name -> TOML file (package data ``benchmarks/suites/*.toml``)."""
    return {p.stem: p for p in sorted(builtin_dir().glob("*.toml"))}


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """A built-in suite by name, or a TOML file; ValueError lists the built-in names otherwise."""
    path = Path(name_or_path)
    builtins = builtin_suites()
    if str(name_or_path) in builtins and not path.is_file():
        path = builtins[str(name_or_path)]
    elif not path.is_file():
        raise ValueError(f"unknown suite {str(name_or_path)!r}: not a file; built-in suites: {', '.join(builtins)}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None
    return parse_suite(data, path.stem, base=path.resolve().parent, source=str(path))


def list_suites() -> list[dict[str, Any]]:
    """Built-in suites: name, description, dataset, operators, methods (labels), metrics, images."""
    out = []
    for name in builtin_suites():
        s = load_suite(name)
        out.append({"name": s.name, "description": s.description, "dataset": s.dataset, "split": s.split,
                    "images": s.images, "operators": list(s.operators), "methods": [m.label for m in s.methods],
                    "metrics": list(s.metrics), "models": dict(s.models)})
    return out
