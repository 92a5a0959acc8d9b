"""A run folder as one portable archive (``restore-bench pack`` / ``unpack``): what a long run has finished, small
enough to commit or to carry to another machine, where ``restore-bench run`` continues it and ``report`` / ``table``
read it.

A run folder is large because it keeps every restoration as a PNG, but a finished cell needs none of them: its
per-image metrics and its FID / KID are in the journal. The archive (``.tar.gz``) holds:

* ``run.json`` and ``runs.jsonl`` when present;
* the journals' committed units, merged into ``records/packed.jsonl`` (a torn or uncommitted tail is left out);
* the grid images' ground truth and degraded input (``reference/``, ``degraded/**``) and every cell's restorations
  of them (``outputs/**``): the report's image grids;
* all restorations of each cell whose set metrics (FID, KID) are not journaled yet, when the suite has set
  metrics (from ``run.json``; without it, assumed), so they can still be computed after unpacking. A run
  computes each cell's set metrics as soon as the cell is done, so this is at most the cell it stopped in.

Left out: the measurement cache (``.npy``), which is recomputed exactly, and ``results.csv``, which is rebuilt from
the journal. Unpacked into a fresh folder, ``restore-bench run SUITE --out FOLDER`` recomputes nothing finished.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from benchmarks.runner.journal import read_journals
from restore.runtime.files import atomic_path

__all__ = ["pack_run", "unpack_run"]

PACKED_JOURNAL = "records/packed.jsonl"


def _journal_bytes(rows: list[dict], done: list[dict]) -> bytes:
    """Committed units as journal lines: each unit's rows, then its ``done`` mark."""
    by_unit: dict[str, list[dict]] = {}
    for row in rows:
        by_unit.setdefault(row["unit"], []).append(row)
    lines = []
    for mark in done:
        lines += [json.dumps({"kind": "row", **row}) for row in by_unit.get(mark["unit"], [])]
        lines.append(json.dumps({"kind": "done", **mark}))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _has_set_metrics(run: Path) -> bool:
    from benchmarks.metrics import METRICS

    meta = run / "run.json"
    if not meta.is_file():
        return True  # unknown: keep what set metrics would need
    return any(not METRICS[m].per_image for m in json.loads(meta.read_text())["suite"]["metrics"])


def pack_run(run: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Write the archive of run folder ``run`` to ``dst`` (atomically; module docstring). Returns what went in."""
    run, dst = Path(run), Path(dst)
    rows, done = read_journals(run)
    if not done:
        raise ValueError(f"{run} holds no committed results to pack")
    scored = {d["cell"] for d in done if d.get("set_key")}
    unscored = {d["cell"][:8] for d in done if not d.get("set_key") and d["cell"] not in scored}
    keep_unscored = _has_set_metrics(run)
    grid = {p.relative_to(run / "reference").with_suffix("") for p in (run / "reference").rglob("*.png")}

    def wanted(path: Path) -> bool:
        rel = path.relative_to(run)
        if rel.parts[0] in ("degraded", "reference"):
            return path.suffix == ".png"
        if rel.parts[0] != "outputs" or path.suffix != ".png" or len(rel.parts) < 5:
            return False
        image = Path(*rel.parts[4:]).with_suffix("")  # outputs/<operator>/<method>/<cell dir>/<image id>
        return image in grid or (keep_unscored and rel.parts[3][-8:] in unscored)

    files = [p for p in sorted(run.rglob("*")) if p.is_file() and wanted(p)]
    files += [run / name for name in ("run.json", "runs.jsonl") if (run / name).is_file()]
    journal = _journal_bytes(rows, done)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp, tarfile.open(tmp, "w:gz") as tar:
        info = tarfile.TarInfo(PACKED_JOURNAL)
        info.size = len(journal)
        tar.addfile(info, io.BytesIO(journal))
        for path in files:
            tar.add(path, arcname=str(path.relative_to(run)), recursive=False)
    return {"archive": str(dst), "bytes": dst.stat().st_size, "units": len(done), "files": len(files),
            "cells_scored": len(scored), "cells_unscored": len(unscored)}


def unpack_run(src: str | os.PathLike, run: str | os.PathLike) -> dict:
    """Extract archive ``src`` into the run folder ``run``, which must hold no results yet."""
    src, run = Path(src), Path(run)
    if (run / "records").is_dir() and any((run / "records").iterdir()):
        raise ValueError(f"{run} already holds results; unpack into a fresh folder")
    with tarfile.open(src, "r:gz") as tar:
        names = tar.getnames()
        if PACKED_JOURNAL not in names:
            raise ValueError(f"{src} is not a `restore-bench pack` archive (no {PACKED_JOURNAL})")
        tar.extractall(run, filter="data")  # no absolute paths, links out or devices
    return {"run": str(run), "files": len(names)}
