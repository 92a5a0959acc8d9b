"""The benchmark runner: a suite in, a resumable long-format results table out (DESIGN.md §4.4, §4.5, §6).

One module per stage; values pass between them explicitly (frozen dataclasses, plain values):

* :mod:`~benchmarks.runner.plan` -- suite -> :class:`Plan` (cells with their keys, images, shard);
* :mod:`~benchmarks.runner.measure` -- a batch -> its measurements and drawn operator, cached on disk;
* :mod:`~benchmarks.runner.execute` -- a cell's method on a batch -> restorations and a batch result;
  also the one place the runner derives generators from seeds;
* :mod:`~benchmarks.runner.journal` -- batch results -> durable journal lines, and back to what is finished;
* :mod:`~benchmarks.runner.aggregate` -- metrics over restorations (per image, FID / KID per cell) and
  the results frame over every journal;
* :mod:`~benchmarks.runner.session` -- :func:`run_suite`, the stages in order for one process, and the
  run records; :mod:`~benchmarks.runner.progress` displays progress;
* :mod:`~benchmarks.runner.cost` -- a plan -> its estimated cost (``--dry-run``), before any stage runs.
* :mod:`~benchmarks.runner.pack` -- a run folder -> a small archive of what it finished, and back elsewhere.

What an output folder holds::

    records/rank<r>.jsonl   append-only journal of each writing process: result rows and "done" marks
    degraded/<op>-seed<s>-<hash>/<image>.npy   cached measurements y (float32, exact), made once
    degraded/.../<image>.png, reference/<image>.png   degraded input and ground truth of the grid images
    outputs/<op>/<method>/nfe<k>-seed<s>-<hash>/<image>.png   restorations (8-bit; metrics use these values)
    results.csv             the long table of the current suite (merged from every journal)
    run.json                resolved suite, cells, environment (versions, git commit, device), timing
    runs.jsonl              environment and summary of every session that added results

Restarting the same command after a crash or ``kill -9`` recomputes nothing that was committed; editing
the suite reruns only the cells whose configuration changed. Under ``torchrun`` (``WORLD_SIZE`` > 1)
rank r restores images r, r + W, ... of every cell into its own journal; rank 0 waits for all, computes
the set metrics from every rank's PNGs and writes the same ``results.csv`` one process would. Results
depend on neither batch size, order nor the number of processes. In the table, ``seconds`` is the
method's wall time per image (batch time / batch size, after a CUDA synchronise), ``nfe`` and
``nfe_backward`` the counted network forward and backward passes per image.
"""

from benchmarks.runner.aggregate import results_frame
from benchmarks.runner.journal import COLUMNS, Finished, Journal, read_journals, repair_tail
from benchmarks.runner.plan import GRID_IMAGES, RUNNER_VERSION, Cell, Plan, make_plan, resolve_cells, slug
from benchmarks.runner.session import run_suite

__all__ = [
    "COLUMNS",
    "GRID_IMAGES",
    "RUNNER_VERSION",
    "Cell",
    "Finished",
    "Journal",
    "Plan",
    "make_plan",
    "read_journals",
    "repair_tail",
    "resolve_cells",
    "results_frame",
    "run_suite",
    "slug",
]
