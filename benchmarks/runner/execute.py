"""Stage 3, executing: run each cell's method on this shard's images and journal every batch.

Input: the :class:`~benchmarks.runner.plan.Plan`, the output folder and device, the open
:class:`~benchmarks.runner.journal.Journal` and what earlier runs finished
(:class:`~benchmarks.runner.journal.Finished`). Output: :class:`Execution` -- images restored, method
seconds and one line per failed cell (a broken cell never stops the others).

Per cell, images are split into those the method has not run on (or whose saved restoration is gone)
and those that only miss metrics added to the suite later. Batches hold images of one size, at most
``batch_size``. For each batch: derive the generators (:func:`batch_generators`), get the measurements
(:mod:`~benchmarks.runner.measure`), then either restore -- the batch's dataset labels passed as
``class_labels`` when the cell's model is class-conditional (``Cell.class_labels``), method call timed after a CUDA
synchronise, network passes counted, restorations saved as 8-bit PNG and scored from those values --
or rescore the saved PNGs; each batch's :class:`~benchmarks.runner.journal.BatchResult` is committed
before the next batch starts. Gradient methods (``needs_grad``) run with autograd on, the rest
under ``torch.inference_mode()``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape

from benchmarks.runner.aggregate import image_metrics
from benchmarks.runner.journal import BatchResult, Finished, Journal, commit_images
from benchmarks.runner.measure import Measured, MeasurementCache
from benchmarks.runner.plan import Cell, Plan
from benchmarks.runner.progress import ProgressBar
from operators import build_operator
from restore.engine.acceleration import OFF, Acceleration
from restore.runtime.seeds import measurement_generators, restoration_generators


@dataclass(frozen=True)
class BatchGenerators:
    """Per-image generators of a batch: one stream for the measurement, an independent one for the method."""

    measure: list[torch.Generator]
    method: list[torch.Generator]


def batch_generators(seed: int, ids: list[str], device: torch.device) -> BatchGenerators:
    """The generators of a batch by the toolkit's one seed rule (`restore.runtime.seeds`): measurement on the
    CPU, restoration on ``device``."""
    return BatchGenerators(measurement_generators(seed, ids), restoration_generators(seed, ids, device))


@dataclass(frozen=True)
class Execution:
    """What running the cells did in this process."""

    images_restored: int = 0
    method_seconds: float = 0.0
    failures: tuple[str, ...] = ()


def load_model(ref: str | None, device: torch.device,
               acceleration: Acceleration = OFF) -> tuple[torch.nn.Module | None, int]:
    """``(model, parameter count)`` of a cell's model reference, on ``device`` with ``acceleration`` applied;
    ``(None, 0)`` for methods without one."""
    if ref is None:
        return None, 0
    from restore.engine.checkpoints import load_model as load
    from restore.engine.networks import count_parameters

    model = load(ref, device=device).requires_grad_(False)
    return acceleration.apply(model), count_parameters(model)


def restore_batch(cell: Cell, method, model, params: int, ids: list[str], x: torch.Tensor, measured: Measured,
                  generators: list[torch.Generator], out: Path, metrics,
                  labels: torch.Tensor | None = None) -> tuple[BatchResult, float]:
    """Run the cell's method on one batch (``labels``: its class labels, for a class-conditional model), save the
    restorations and score them; returns the result and the method's wall time for the whole batch."""
    from restore.app.io import output_path, write_png

    op, y = measured.op, measured.y
    counting = model.counter.counting() if model is not None else nullcontext(None)
    grad = torch.enable_grad() if method.needs_grad else torch.inference_mode()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    with grad, counting as tally:
        x_hat = method(model, y, op, nfe=cell.nfe, generator=generators, class_labels=labels, **cell.hparams)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    elapsed = time.perf_counter() - start
    x_hat = x_hat.detach()
    if x_hat.shape != x.shape:
        raise ValueError(f"{cell.describe()}: method returned shape {tuple(x_hat.shape)}, expected {tuple(x.shape)}")
    folder = cell.out_dir(out)
    for k, i in enumerate(ids):
        write_png(x_hat[k:k + 1], output_path(folder, i))
    per_image = elapsed / len(ids)
    counted = (tally.forward, tally.backward) if tally is not None else (0, 0)
    values = image_metrics(metrics, x_hat, x, y, op)
    return BatchResult(cell, ids, values, {i: per_image for i in ids}, {i: counted for i in ids}, params), elapsed


def rescore_batch(cell: Cell, ids: list[str], x: torch.Tensor, measured: Measured, out: Path, metrics,
                  finished: Finished) -> BatchResult:
    """Metrics added to a suite after the method ran, computed from the saved restorations (seconds and
    counted NFE carried over from the run that made them)."""
    from restore.app.io import output_path, read_image

    x_hat = torch.stack([read_image(output_path(cell.out_dir(out), i)) for i in ids]).to(x.device)
    recs = [finished.record(cell.key, i) for i in ids]
    seconds = {i: r["seconds"] for i, r in zip(ids, recs)}
    nfe = {i: (r["nfe"], r["nfe_backward"]) for i, r in zip(ids, recs)}
    values = image_metrics(sorted(metrics), x_hat, x, measured.y, measured.op)
    return BatchResult(cell, ids, values, seconds, nfe, recs[0]["params"])


def _batches(dataset, indices: list[int], batch_size: int) -> list[list[int]]:
    from restore.app.io import group_by_size

    groups = group_by_size([dataset.image_size(i) for i in indices], batch_size)
    return [[indices[j] for j in g] for g in groups]


def run_cells(plan: Plan, out: Path, device: torch.device, journal: Journal, finished: Finished,
              progress: ProgressBar, acceleration: Acceleration = OFF, cell_done=None) -> Execution:
    """Run every cell of ``plan`` on this shard's images (see the module docstring); ``cell_done(cell)`` is called
    after each cell that ran without failing."""
    from restore.app.io import output_path
    from restore.methods import get_method

    suite, dataset, indices = plan.suite, plan.dataset, plan.mine
    cache = MeasurementCache(out, dataset.name, plan.grid_ids)
    ids_of = {i: dataset.image_id(i) for i in indices}
    metrics = suite.image_metrics
    models: dict[str, tuple[torch.nn.Module | None, int]] = {}  # loaded once per run, on first use
    restored, seconds, failures = 0, 0.0, []
    for cell in plan.cells:
        method, family = get_method(cell.method), build_operator(cell.operator)
        status = {i: finished.missing(cell.key, ids_of[i], metrics) for i in indices}
        folder = cell.out_dir(out)
        for i in indices:  # metrics come from the saved restoration: run again if it is gone
            if status[i] and not output_path(folder, ids_of[i]).is_file():
                status[i] = None
        to_run = [i for i in indices if status[i] is None]
        to_rescore = [i for i in indices if status[i]]
        progress.start_cell(cell.describe(), len(to_run) + len(to_rescore))
        try:
            batches = ([(b, False) for b in _batches(dataset, to_run, suite.batch_size)]
                       + [(b, True) for b in _batches(dataset, to_rescore, suite.batch_size)])
            for batch, rescore in batches:
                ids, x = dataset.get_batch(batch)
                x = x.to(device)
                gens = batch_generators(cell.seed, ids, device)
                measured = cache.measure(family, cell.operator, cell.seed, ids, x, gens.measure)
                if rescore:
                    missing = set().union(*(status[i] for i in batch))
                    commit_images(journal, suite.name, rescore_batch(cell, ids, x, measured, out, missing, finished))
                else:
                    if cell.model not in models:
                        models[cell.model] = load_model(cell.model, device, acceleration)
                    model, params = models[cell.model]
                    labels = dataset.batch_labels(batch).to(device) if cell.class_labels else None
                    result, elapsed = restore_batch(cell, method, model, params, ids, x, measured, gens.method, out,
                                                    metrics, labels)
                    commit_images(journal, suite.name, result)
                    seconds += elapsed
                    restored += len(ids)
                progress.advance(len(ids))
            if cell_done is not None:
                cell_done(cell)
        except Exception as e:  # one broken cell must not stop the others; reported at the end
            failures.append(f"{cell.describe()}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            progress.note(f"[red]failed[/red] {escape(failures[-1])}")
    return Execution(restored, seconds, tuple(failures))
