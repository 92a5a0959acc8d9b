"""`restore-bench tune SUITE`: the same, recorded tuning effort for every method of a suite.

For each cell (method entry, operator, NFE > 0) whose method declares a search space (``Method.space``, next to
its code), a study of ``trials`` trials searches the space with Optuna's TPE sampler (seeded) on a held-out set of
images, optimising one metric of the suite's metric registry (``objective``: PSNR, SSIM, consistency-PSNR, or
FID / KID against the suite's FID reference). Every trial is a one-cell run of the benchmark runner on the held-out
images, so trials measure exactly what ``restore-bench run`` measures. The first trial of every study is the
method's current hyper-parameters (its defaults and the suite's ``hparams``), so a tuned value is never worse than
the default on the held-out set; every method gets the same number of trials, failed trials included.

Held-out images: ``held_out_images`` images of ``held_out_split`` (default: the suite's split) from
``held_out_start`` on (default: right after the suite's evaluation images). A held-out range that overlaps the
evaluation images of the same split is refused.

The studies live in ``OUT/optuna.journal`` (Optuna's journal storage), so an interrupted tuning resumes: finished
trials are kept and each study runs only its missing trials (the sampler's random state is not stored, so the
trials after a resume may differ from those of an uninterrupted run; the record keeps every trial). The result is
a suite file, ``OUT/<suite>-tuned.toml``: the suite with each tuned cell as its own ``[[methods]]`` entry labelled
``<label> (tuned)`` (so tables mark it), its chosen values as ``hparams``, and a ``[tuning]`` table with the
provenance (held-out images, objective, trials, best and default values per cell, the speed options, and the
weights sha256 of every model the tuned cells ran on); ``restore-bench run`` takes it as it is, and warns when it
loads other weights for a model alias (tuned values are specific to the model). ``OUT/trials.csv`` lists every
trial.

A suite that is already tuned (it has a ``[tuning]`` table) is tuned further: its ``(tuned)`` entries and their
records are kept as they are, and only the other cells (e.g. methods added since) are tuned, under the same
protocol (objective, trials, seed, held-out images, speed options; another protocol is refused) and on the same
weights for every model alias the record names (other weights are refused). The result keeps the suite's name.

``models`` (``--model ALIAS=PATH``) tunes on other weights than the suite's references, e.g. a campaign's models
before they are bundled under the suite's names: the tuned file keeps the suite's references, and its record holds
the sha256 of the weights the trials ran on. It also keeps the leading comment block of the suite file.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from itertools import takewhile
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.metrics import METRICS
from benchmarks.suites import MethodEntry, Suite, load_suite
from restore.engine.acceleration import OFF, Acceleration
from restore.methods import Choice, Float, get_method
from restore.runtime.files import write_csv_atomic, write_text_atomic

__all__ = ["held_out", "tune_suite", "tuning_frame", "tuning_summary"]

TUNED = " (tuned)"  # label suffix of tuned entries


def held_out(suite: Suite, images: int, start: int | None = None, split: str | None = None) -> Suite:
    """The held-out suite: ``images`` images of ``split`` from ``start`` (defaults: the suite's split, right after
    its evaluation images); ValueError if they overlap the evaluation images."""
    split = suite.split if split is None else split
    if start is None:
        if suite.images is None and split == suite.split:
            raise ValueError(f"suite {suite.name!r} evaluates every image of its split: give a held-out split")
        start = suite.start + (suite.images or 0) if split == suite.split else 0
    if split == suite.split:
        end = math.inf if suite.images is None else suite.start + suite.images
        if start < end and suite.start < start + images:
            raise ValueError(f"held-out images [{start}, {start + images}) of split {split!r} overlap the evaluation "
                             f"images [{suite.start}, {end}) of suite {suite.name!r}")
    return replace(suite, name=f"{suite.name}-held-out", split=split, start=start, images=images)


def _sample(trial, space: dict[str, Float | Choice]) -> dict[str, Any]:
    values = {}
    for name, dist in space.items():
        if isinstance(dist, Float):
            values[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
        else:
            values[name] = trial.suggest_categorical(name, list(dist.choices))
    return values


def _cells(suite: Suite) -> list[tuple[MethodEntry, str, int]]:
    """(entry, operator, NFE) of every cell with something to tune."""
    from operators import build_operator

    out = []
    for entry in suite.methods:
        method = get_method(entry.name)
        if not method.space:
            continue
        for op in entry.operators or suite.operators:
            if method.supports(build_operator(op)):
                out += [(entry, op, nfe) for nfe in entry.nfe if nfe > 0]
    return out


def _score(path: Path, objective: str) -> float:
    frame = pd.read_csv(path / "results.csv") if (path / "results.csv").is_file() else pd.DataFrame()
    values = frame.loc[frame["metric"] == objective, "value"] if len(frame) else pd.Series(dtype=float)
    return float(values.mean()) if len(values) else math.nan  # NaN: Optuna records the trial as failed


def tune_suite(suite: Suite | str, out: str | Path, *, trials: int, objective: str = "psnr",
               held_out_images: int = 100, held_out_start: int | None = None, held_out_split: str | None = None,
               seed: int = 0, device: str | None = None, acceleration: Acceleration = OFF,
               models: dict[str, str] | None = None, echo=print) -> Path:
    """Tune every cell of ``suite`` (see the module docstring) into ``out``; returns the tuned suite file.
    ``acceleration`` speeds the trials' networks up and is recorded (rounding only, as in the runner); ``models``
    replaces model aliases for the trials only."""
    import optuna
    import tomli_w
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from benchmarks.runner import run_suite, slug

    declared = load_suite(suite) if isinstance(suite, str) else suite
    suite = declared.with_models(models or {})
    if objective not in METRICS:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(METRICS)}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    heldout = held_out(suite, held_out_images, held_out_start, held_out_split)
    heldout = replace(heldout, metrics=(objective,), seeds=heldout.seeds[:1])
    direction = "maximize" if METRICS[objective].higher_is_better else "minimize"
    protocol = {"objective": objective, "direction": direction, "trials_per_cell": trials, "sampler": "optuna TPE",
                "seed": seed, "acceleration": acceleration.to_dict(),
                "held_out": {"dataset": heldout.dataset, "split": heldout.split or "", "start": heldout.start,
                             "images": heldout.images}}
    _same_protocol(suite, protocol)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    records, tuned_entries, rows = list(suite.tuning.get("cells", [])), [], []
    for entry, op, nfe in [c for c in _cells(suite) if not c[0].label.endswith(TUNED)]:
        study_name = f"{entry.label}|{op}|{nfe}"
        study = optuna.create_study(study_name=study_name, storage=storage, direction=direction,
                                    sampler=optuna.samplers.TPESampler(seed=seed), load_if_exists=True)
        space = get_method(entry.name).space
        defaults = _defaults(entry, space)
        if not study.trials:
            study.enqueue_trial(defaults, user_attrs={"default": True})

        def run_trial(trial, entry=entry, op=op, nfe=nfe, space=space, study_name=study_name,
                      defaults=defaults) -> float:
            # the default trial leaves a keyword whose default is None to the method (e.g. DPS's per-operator scale)
            keys = defaults.keys() if trial.user_attrs.get("default") else space.keys()
            values = _sample(trial, {k: space[k] for k in keys})
            cell = replace(entry, nfe=(nfe,), operators=(op,), hparams={**entry.hparams, **values})
            folder = out / "trials" / slug(study_name) / f"{trial.number:04d}"
            run_suite(replace(heldout, operators=(op,), methods=(cell,)), folder, progress=False, device=device,
                      acceleration=acceleration)
            return _score(folder, objective)

        left = trials - sum(t.state.is_finished() for t in study.trials)  # an enqueued trial is still waiting
        if left > 0:
            echo(f"[tune] {study_name}: {left} trial(s) of {trials}")
            study.optimize(run_trial, n_trials=left, catch=(ValueError, RuntimeError))
        finished = [t for t in study.trials if t.state.is_finished()]
        done = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
        rows += [{"cell": study_name, "trial": t.number, "state": t.state.name, "value": t.value, **t.params}
                 for t in finished]
        if not done:
            echo(f"[tune] {study_name}: every trial failed; the entry keeps its values")
            continue
        best = study.best_trial
        default_value = study.trials[0].value
        records.append({"cell": study_name, "method": entry.name, "operator": op, "nfe": nfe,
                        "trials": len(finished), "failed": len(finished) - len(done),
                        "best": float(best.value), "best_params": dict(best.params),
                        "default": None if default_value is None else float(default_value),
                        "default_params": defaults})
        tuned_entries.append((entry, op, nfe, {**entry.hparams, **best.params}))

    write_csv_atomic(pd.DataFrame(rows), out / "trials.csv")
    weights = {**suite.tuning.get("models", {}), **_tuned_models(suite, [entry for entry, *_ in tuned_entries])}
    document = _tuned_document(declared, tuned_entries, {**protocol, "optuna": optuna.__version__, "models": weights,
                                                      "cells": records})
    dst = out / f"{suite.name}-tuned.toml"
    write_text_atomic(_leading_comments(declared.source) + tomli_w.dumps(document), dst)
    load_suite(dst)  # the file must load as a suite as it is
    return dst


def tuning_frame(record: dict[str, Any]) -> pd.DataFrame:
    """One row per tuned cell of a ``[tuning]`` record: trials, the held-out score of the default and of the chosen
    values, and both parameter sets (3 significant digits)."""
    def params(values: dict, keys=()) -> str:
        shown = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()]
        return ", ".join(shown + [f"{k}=(the method's)" for k in keys if k not in values])

    rows = [{"method": c["method"], "operator": c["operator"], "NFE": c["nfe"], "trials": c["trials"],
             "failed": c["failed"], "default": c.get("default", math.nan), "tuned": c["best"],
             "default values": params(c["default_params"], c["best_params"]), "tuned values": params(c["best_params"])}
            for c in record.get("cells", [])]
    return pd.DataFrame(rows, columns=["method", "operator", "NFE", "trials", "failed", "default", "tuned",
                                       "default values", "tuned values"])


def tuning_summary(record: dict[str, Any]) -> str:
    """One line on how a ``[tuning]`` record was made (objective, trials, held-out images, sampler)."""
    h = record.get("held_out", {})
    return (f"{record.get('objective')} ({record.get('direction')}) on {h.get('images')} held-out images "
            f"{h.get('dataset')}:{h.get('split')} [{h.get('start')}, {h.get('start', 0) + h.get('images', 0)}), "
            f"{record.get('trials_per_cell')} trials per cell ({record.get('sampler')}, seed {record.get('seed')}); "
            f"tuned on weights " + ", ".join(f"{a}={sha[:12]}" for a, sha in record.get("models", {}).items()))


def _same_protocol(suite: Suite, protocol: dict[str, Any]) -> None:
    """Refuse to tune an already tuned ``suite`` further under another protocol, or on other weights for a model
    alias its record names (the kept and the new values must be comparable)."""
    record = suite.tuning
    if not record:
        return
    changed = [f"{k} {record.get(k)!r} -> {v!r}" for k, v in protocol.items() if record.get(k) != v]
    if changed:
        raise ValueError(f"suite {suite.name!r} was tuned with another protocol ({'; '.join(changed)}); tune it "
                         "with the same settings")
    from restore.engine.checkpoints import resolve_model_path, weights_sha256

    for alias, sha in record.get("models", {}).items():
        ref = suite.models.get(alias)
        if ref is not None and weights_sha256(resolve_model_path(ref)) != sha:
            raise ValueError(f"suite {suite.name!r} was tuned on other weights for model {alias!r} (sha256 "
                             f"{sha[:12]}...) than {ref}: pass those weights with --model {alias}=PATH")


def _tuned_models(suite: Suite, entries: list[MethodEntry]) -> dict[str, str]:
    """Model alias -> weights sha256 of the models the tuned cells ran on (the runner warns when a run of the tuned
    suite loads other weights: `benchmarks.runner.plan.tuning_mismatches`)."""
    from restore.engine.checkpoints import resolve_model_path, weights_sha256

    return {e.model: weights_sha256(resolve_model_path(suite.model_ref(e))) for e in entries if suite.model_ref(e)}


def _defaults(entry: MethodEntry, space: dict) -> dict[str, Any]:
    """The method's current values of the searched keywords (suite hparams, else the function's defaults); a
    default that is None (chosen inside the method) is left to the sampler."""
    params = inspect.signature(get_method(entry.name).fn).parameters
    values = {name: entry.hparams.get(name, params[name].default) for name in space}
    return {k: v for k, v in values.items() if v is not None and v is not inspect.Parameter.empty}


def _tuned_document(suite: Suite, tuned: list[tuple[MethodEntry, str, int, dict]], record: dict) -> dict[str, Any]:
    """The suite as a TOML document with tuned cells as their own entries and the [tuning] record."""
    from operators import build_operator

    data = suite.to_dict()
    methods = []
    cells = {(e.label, op, nfe) for e, op, nfe, _ in tuned}
    for entry in suite.methods:  # the untuned cells stay, grouped by the operators that keep the same budgets
        groups: dict[tuple[int, ...], list[str]] = {}
        method = get_method(entry.name)
        for op in [o for o in entry.operators or suite.operators if method.supports(build_operator(o))]:
            kept = tuple(n for n in entry.nfe if (entry.label, op, n) not in cells)
            groups.setdefault(kept, []).append(op)
        for kept, ops in groups.items():
            if kept:
                methods.append({**_entry_table(entry), "nfe": list(kept), "operators": ops})
    for entry, op, nfe, hparams in tuned:
        methods.append({**_entry_table(entry), "label": entry.label + TUNED, "nfe": [nfe], "operators": [op],
                        "hparams": hparams})
    doc = {k: v for k, v in data.items() if k not in ("methods", "source", "tuning", "fid") and v is not None}
    doc["name"] = suite.name if suite.tuning else f"{suite.name}-tuned"
    doc["fid"] = {k: v for k, v in data["fid"].items() if v is not None}
    doc["methods"] = methods
    doc["tuning"] = _toml_safe(record)
    return doc


def _leading_comments(source: str) -> str:
    """The comment lines that open the suite file ``source`` (its description for readers), if any."""
    if not source or not Path(source).is_file():
        return ""
    return "".join(takewhile(lambda line: line.startswith("#"), Path(source).read_text().splitlines(keepends=True)))


def _entry_table(entry: MethodEntry) -> dict[str, Any]:
    table = {k: v for k, v in entry.to_dict().items() if v is not None}
    if not table.get("hparams"):
        table.pop("hparams", None)
    return table


def _toml_safe(value):
    """None has no TOML form: drop it from tables and lists."""
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_toml_safe(v) for v in value if v is not None]
    return value
