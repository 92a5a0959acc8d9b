"""One call of :func:`run_suite`: the stages put together for one process, plus the run's records.

Input: a suite, an output folder and the process layout (torchrun's environment, or ``shard``).
Output: a summary dict; on rank 0 also ``results.csv``, ``run.json`` and a line in ``runs.jsonl``.

Order: plan (all configuration errors before any file is written), read what earlier runs finished,
execute this shard's cells (one process computes each cell's set metrics as soon as the cell is done, so a run
stopped later keeps them: :mod:`~benchmarks.runner.pack`), wait for every shard, then on rank 0 re-read every
journal, compute the remaining set metrics, and write the results frame and the run record (resolved suite,
cells, cache folders, environment, fairness report of the models). Rank 0 writes the run record once before
executing too, marked ``"finished": false``, so that `report` and `plot` can show a run in progress (or one that
was stopped) from what its journals hold; the session's end rewrites it with ``"finished": true``.
``results.csv`` and ``run.json`` are replaced atomically; ``runs.jsonl`` gains one line per session.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner.aggregate import results_frame, set_metrics
from benchmarks.runner.execute import run_cells
from benchmarks.runner.journal import Finished, Journal
from benchmarks.runner.measure import degraded_dir
from benchmarks.runner.plan import GRID_IMAGES, make_plan
from benchmarks.runner.progress import ProgressBar
from benchmarks.suites import Suite
from restore.engine.acceleration import OFF, Acceleration
from restore.records.provenance import environment
from restore.runtime import distributed
from restore.runtime.files import write_csv_atomic, write_text_atomic


def run_suite(suite: Suite, out: str | os.PathLike, *, limit: int | None = None, device: str | None = None,
              progress: bool = True, shard: tuple[int, int] | None = None,
              acceleration: Acceleration = OFF) -> dict[str, Any]:
    """Run (or resume) ``suite`` into folder ``out``; returns a summary (cells, images, timings, failures).

    ``shard=(rank, world_size)`` runs one shard without torch.distributed (the journals merge the
    same way); by default the shard comes from torchrun's environment. Only rank 0 computes set
    metrics and writes ``results.csv`` and ``run.json``. ``acceleration`` (bf16, channels_last, compile) applies to
    every model of the run and is recorded in ``run.json``, not in the cell keys (like the device).
    """
    wall = time.perf_counter()
    if shard is None:
        rank, world, dev = distributed.setup(device)
    else:
        (rank, world), dev = shard, torch.device(device or "cpu")
    plan = make_plan(suite, limit, rank, world)  # every configuration error before anything is written
    for line in plan.tuning_mismatches if rank == 0 else ():
        warnings.warn(line, stacklevel=2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _write_run_record(plan, out, dev, limit, acceleration, {"cells": len(plan.cells), "images": len(plan.ids)},
                          finished=False)
    finished = Finished.read(out)
    mine = plan.mine
    failures: list[str] = []
    with Journal(out / "records" / f"rank{rank}.jsonl") as journal:
        bar = ProgressBar(progress, len(plan.cells) * len(mine))
        try:
            bar.skip(sum(finished.missing(c.key, plan.dataset.image_id(i), suite.image_metrics) == set()
                         for c in plan.cells for i in mine))
            def cell_done(cell) -> None:  # one process: score each cell at once, so a stopped run keeps them
                set_metrics(plan, out, dev, journal, Finished.read(out), bar, cells=[cell])

            done = run_cells(plan, out, dev, journal, finished, bar, acceleration,
                             cell_done=cell_done if world == 1 else None)
            failures += done.failures
            distributed.barrier(world)
            if rank == 0:
                failures += set_metrics(plan, out, dev, journal, Finished.read(out), bar)  # every rank's work
        finally:
            bar.stop()
    summary = {"suite": suite.name, "out": str(out), "cells": len(plan.cells), "images": len(plan.ids), "rank": rank,
               "world_size": world, "images_restored": done.images_restored,
               "method_seconds": round(done.method_seconds, 3), "wall_seconds": round(time.perf_counter() - wall, 3),
               "failures": failures, "tuning_mismatches": list(plan.tuning_mismatches)}
    if rank == 0:
        _write_records(plan, out, dev, limit, summary, acceleration)
    return summary


def _write_records(plan, out: Path, device: torch.device, limit: int | None, summary: dict[str, Any],
                   acceleration: Acceleration) -> None:
    """``results.csv``, ``run.json`` and a line in ``runs.jsonl``; adds rows and fairness violations to ``summary``."""
    frame = results_frame(out, {c.key: c.label for c in plan.cells}, plan.suite, list(plan.ids))
    write_csv_atomic(frame, out / "results.csv")
    summary["rows"] = len(frame)
    record = _write_run_record(plan, out, device, limit, acceleration, summary, finished=True)
    with open(out / "runs.jsonl", "a", encoding="utf-8") as f:  # every session that added results
        f.write(json.dumps({"environment": record["environment"], "summary": summary}, default=str) + "\n")


def _write_run_record(plan, out: Path, device: torch.device, limit: int | None, acceleration: Acceleration,
                      summary: dict[str, Any], *, finished: bool) -> dict[str, Any]:
    """Write ``run.json`` (resolved suite, cells, cache folders, environment, fairness report) and return it; adds
    the fairness violations to ``summary``."""
    from benchmarks.fairness import fairness_report

    suite, cells, ids = plan.suite, list(plan.cells), list(plan.ids)
    models = fairness_report(suite.model_refs)
    summary["fairness_violations"] = models["violations"]
    record = {
        "suite": suite.to_dict(), "images": len(ids), "limit": limit, "finished": finished,
        "acceleration": acceleration.to_dict(), "environment": environment(device, plan.world_size),
        "models": models, "summary": summary, "grid_ids": ids[:GRID_IMAGES],
        "cells": [{"key": c.key, "label": c.label, "dir": str(c.out_dir(out).relative_to(out)), **c.config,
                   "model": c.model, "class_labels": c.class_labels} for c in cells],
        "degraded": {spec: {seed: str(degraded_dir(out, plan.dataset.name, spec, seed).relative_to(out))
                            for seed in suite.seeds} for spec in suite.operators},
    }
    write_text_atomic(json.dumps(record, indent=1, default=str) + "\n", out / "run.json")
    return record
