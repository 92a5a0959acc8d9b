"""Stage 4, journaling: results go to an append-only file per process, one atomic commit per unit of work.

Input: :class:`BatchResult` values (a cell's metric values, method seconds and counted NFE for some
images -- or for the whole image set, id ``"*"``, with FID / KID). Output: lines in
``records/rank<r>.jsonl``; reading back gives the committed rows (:func:`read_journals`) and what is
finished (:class:`Finished`), which the next run uses to skip work.

A commit writes the unit's result rows and then one ``done`` line naming the unit (cell, image ids,
metrics, and for per-image units the seconds and counted NFE), in one write followed by flush and
fsync. Rows count only once their unit's ``done`` line exists, and a torn last line (a write killed
half-way) is cut off before the next append, so ``kill -9`` loses at most the unit being written.
A lock allows one writer per journal file.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from benchmarks.runner.plan import Cell, Plan

COLUMNS = ["suite", "dataset", "image_id", "operator", "method", "nfe", "seed", "metric", "value", "seconds",
           "nfe_budget", "nfe_backward", "model", "params", "cell"]


@dataclass(frozen=True)
class BatchResult:
    """What one unit of work measured for a cell: ``values[metric][k]`` belongs to ``ids[k]``."""

    cell: Cell
    ids: list[str]
    values: dict[str, list[float]]
    seconds: dict[str, float]  # method wall time per image
    nfe: dict[str, tuple[float, float]]  # counted (forward, backward) per image
    params: int
    extra: dict = field(default_factory=dict)  # more columns on every row (set metrics: n, reference, ...)


def rows(suite: str, result: BatchResult) -> list[dict]:
    """The long-format rows of a result: one per image x metric."""
    cell = result.cell
    base = {"suite": suite, "dataset": cell.dataset, "operator": cell.operator, "method": cell.label,
            "seed": cell.seed, "nfe_budget": cell.nfe, "model": cell.model or "", "params": result.params,
            "cell": cell.key}
    return [{**base, "image_id": i, "metric": m, "value": float(v[k]), "seconds": result.seconds[i],
             "nfe": result.nfe[i][0], "nfe_backward": result.nfe[i][1], **result.extra}
            for m, v in result.values.items() for k, i in enumerate(result.ids)]


def repair_tail(path: Path) -> None:
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
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open (and locked) until close()
        try:  # one writer per journal: a second run on the same folder and rank stops here
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise OSError(f"another run is writing {path}; wait for it or use another --out") from None
        repair_tail(path)
        self._units = 0
        self._tag = f"{path.stem}-{time.time_ns()}"

    def commit(self, rows: list[dict], done: dict) -> None:
        """Append ``rows`` and their ``done`` mark as one unit."""
        self._units += 1
        unit = f"{self._tag}-{self._units}"
        lines = [json.dumps({"kind": "row", "unit": unit, **r}) for r in rows]
        lines.append(json.dumps({"kind": "done", "unit": unit, **done}))
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def commit_images(journal: Journal, suite: str, result: BatchResult) -> None:
    """Journal per-image results; the ``done`` mark keeps the seconds and the first image's counted NFE."""
    first = result.nfe[result.ids[0]]
    journal.commit(rows(suite, result),
                   {"cell": result.cell.key, "ids": result.ids, "metrics": list(result.values),
                    "seconds": result.seconds, "nfe": first[0], "nfe_backward": first[1], "params": result.params})


def commit_set(journal: Journal, suite: str, result: BatchResult, set_key: str) -> None:
    """Journal set metrics (image id ``"*"``) computed on the image set ``set_key``."""
    journal.commit(rows(suite, result),
                   {"cell": result.cell.key, "ids": ["*"], "metrics": list(result.values), "set_key": set_key})


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
    """What is finished: per (cell, image) the metrics, method seconds and counted NFE; per cell the set metrics.

    Built once from the ``done`` marks and read-only afterwards.
    """

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

    @classmethod
    def read(cls, out: Path) -> Finished:
        """What the journals of output folder ``out`` say is finished."""
        return cls(read_journals(out)[1])

    def missing(self, cell: str, image_id: str, metrics) -> set[str] | None:
        """None: the method has not run on the image; else the metrics still to compute."""
        rec = self.images.get((cell, image_id))
        return None if rec is None or "seconds" not in rec else set(metrics) - rec["metrics"]

    def progress(self, plan: Plan, cell: Cell) -> tuple[int, bool]:
        """``(restored, complete)`` of ``cell`` on ``plan``'s images: how many its method has restored, and whether
        the cell needs no more work (every image with every image metric, the set metrics on exactly these images)."""
        missing = [self.missing(cell.key, i, plan.suite.image_metrics) for i in plan.ids]
        restored = sum(m is not None for m in missing)
        scored = set(plan.suite.set_metrics) <= self.sets.get((cell.key, plan.image_set_key), set())
        return restored, scored and all(m == set() for m in missing)

    def record(self, cell: str, image_id: str) -> dict:
        """The finished image's ``{"seconds", "nfe", "nfe_backward", "params", "metrics"}``."""
        return self.images[cell, image_id]
