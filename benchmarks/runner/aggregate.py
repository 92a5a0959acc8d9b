"""Stage 5, aggregating: metrics over restorations, and the results frame over every journal.

* :func:`image_metrics` -- per-image metrics (PSNR, SSIM, consistency-PSNR, ...) of a batch, from the
  restorations as saved (8-bit), the clean images, the measurements and the operator that made them.
* :func:`set_metrics` -- per cell, FID / KID of the saved restorations of *all* images (every shard's)
  against the suite's reference set; returns the :class:`~benchmarks.runner.journal.BatchResult` values
  (image id ``"*"``) it journaled and a note for every cell it had to skip.
* :func:`results_frame` -- the long table of an output folder: one row per cell x image x metric
  (``"*"`` for set metrics), :data:`~benchmarks.runner.journal.COLUMNS` first. The last committed
  value of each (cell, image, metric) wins; it can be narrowed to the current suite's cells and images.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape

from benchmarks.runner.journal import COLUMNS, BatchResult, Finished, Journal, commit_set, read_journals
from benchmarks.runner.plan import Cell, Plan, set_key
from benchmarks.runner.progress import ProgressBar
from benchmarks.suites import Suite


def image_metrics(names, x_hat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, op) -> dict[str, list[float]]:
    """``{metric: per-image values}`` for the registered metrics ``names`` (:mod:`benchmarks.metrics`)."""
    from benchmarks.metrics import get_metric

    with torch.inference_mode():
        return {m: get_metric(m)(x_hat=x_hat, x=x, y=y, op=op).tolist() for m in names}


def reference_key(suite: Suite, device: torch.device) -> str:
    """Cached Inception features of the suite's FID reference set (computed once, then read from the cache)."""
    from benchmarks.fid import cached_features
    from operators.utils import to_uint8
    from restore.datasets import DATASETS, build_dataset

    ref = suite.fid
    name = ref.dataset or suite.dataset
    split = ref.split or (("train" if "train" in DATASETS[name][1] else None) if name in DATASETS else None)
    ds = build_dataset(name, split)
    n = min(ref.images or len(ds), len(ds))
    images = torch.cat([to_uint8(x) for _, x in ds.batches(1000, range(n))])
    return cached_features(images, device=device)[0]


def set_metrics(plan: Plan, out: Path, device: torch.device, journal: Journal, finished: Finished,
                progress: ProgressBar, cells: list[Cell] | None = None) -> list[str]:
    """FID / KID per cell (of ``cells``, default every cell of the plan) from the saved PNGs of every image of the
    plan, journaled as they finish.

    ``finished`` must cover every shard's work. Cells that already have the metrics on this image set
    are skipped; returns one line per cell that could not be scored (not every image restored).
    """
    from benchmarks.fid import compute_fid_kid
    from restore.app.io import output_path, read_image_uint8

    wanted = plan.suite.set_metrics
    if not wanted:
        return []
    ids, key, ref_key, skipped = list(plan.ids), plan.image_set_key, None, []
    for cell in plan.cells if cells is None else cells:
        if set(wanted) <= finished.sets.get((cell.key, key), set()):
            continue
        if any(finished.missing(cell.key, i, ()) is None for i in ids):
            skipped.append(f"{cell.describe()}: FID/KID skipped, not every image was restored")
            continue
        ref_key = ref_key or reference_key(plan.suite, device)
        progress.note(f"FID/KID {escape(cell.describe())}")
        start = time.perf_counter()
        u8 = np.stack([read_image_uint8(output_path(cell.out_dir(out), i)) for i in ids])
        scores = compute_fid_kid(u8, ref_key, device=device)
        seconds = time.perf_counter() - start
        recs = [finished.record(cell.key, i) for i in ids]
        nfe = (float(np.mean([r["nfe"] for r in recs])), float(np.mean([r["nfe_backward"] for r in recs])))
        result = BatchResult(cell, ["*"], {m: [scores[m]] for m in wanted}, {"*": seconds}, {"*": nfe},
                             recs[0]["params"], {"set_key": key, "n": scores["n"], "n_reference": scores["n_reference"],
                                                 "reference": scores["reference_key"]})
        commit_set(journal, plan.suite.name, result, key)
    return skipped


def results_frame(out: str | os.PathLike, labels: dict[str, str] | None = None, suite: Suite | None = None,
                  ids: list[str] | None = None):
    """The long results table of an output folder (pandas DataFrame, :data:`COLUMNS` first).

    Merges every journal; the last committed value of each (cell, image, metric) wins. With ``labels`` (cell
    key -> method label, in the run's cell order) only those cells are kept, in that order, under those labels;
    with ``suite`` and ``ids`` (the current images) only those images and the set metrics computed on exactly them.
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
        keep = frame.image_id.isin(ids) | ((frame.image_id == "*") & (frame.set_key == set_key(suite, list(ids))))
        frame = frame[keep]
    if labels is not None:
        order = {key: k for k, key in enumerate(labels)}
        frame = frame[frame.cell.isin(labels)].assign(method=lambda f: f.cell.map(labels))
        frame = frame.sort_values(by=["cell", "image_id"], key=lambda s: s.map(order) if s.name == "cell" else s,
                                  kind="stable")
    extra = [c for c in frame.columns if c not in COLUMNS and c not in ("unit", "set_key")]
    return frame[COLUMNS + extra].reset_index(drop=True)
