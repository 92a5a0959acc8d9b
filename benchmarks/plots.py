"""Figures from a benchmark run: metric-vs-NFE curves and image grids per operator (matplotlib Agg, no display).

* :func:`metric_plots`: for each operator and each of FID, PSNR and consistency-PSNR present in the
  results, one figure with one line per method (mean over images / seeds, counted NFE on a log axis);
  network-free methods (0 NFE) cannot sit on a log axis and are drawn as dashed horizontal lines.
  Written as PNG and PDF.
* :func:`image_grids`: for each operator, rows = the first images of the run, columns = degraded input,
  each method at one NFE, ground truth (PNG; column order in the file name's companion ``.txt``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch

from benchmarks.runner import GRID_IMAGES, slug
from benchmarks.tables import NAMES, summarize

PLOTTED = ("fid", "psnr", "cpsnr")


def metric_plots(frame: pd.DataFrame, out: str | os.PathLike, metrics=PLOTTED) -> list[Path]:
    """``<metric>_<operator>.png/.pdf`` in ``out`` for every operator and plotted metric; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def colors(i: int) -> str:
        return f"C{i % 10}"

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(frame)
    files = []
    for operator, s in summary.groupby("operator", sort=False):
        for m in metrics:
            col = f"{m}_mean"
            if col not in s or s[col].isna().all():
                continue
            fig, ax = plt.subplots(figsize=(5.5, 3.2))
            curves = s[(s.nfe > 0) & s[col].notna()]
            k = 0
            for k, (method, g) in enumerate(curves.groupby("method", sort=False), start=1):
                g = g.sort_values("nfe")
                ax.errorbar(g.nfe, g[col], yerr=g[f"{m}_ci95"].fillna(0), marker="o", ms=4, capsize=2,
                            label=method, color=colors(k - 1))
            for j, row in enumerate(s[(s.nfe == 0) & s[col].notna()].itertuples()):
                ax.axhline(getattr(row, col), ls=("--", ":", "-.")[j % 3], lw=1.2, color=colors(k + j),
                           label=row.method)
            if len(curves):
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.set_xticks(sorted(set(curves.nfe)))
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("NFE (counted)")
            ax.set_ylabel(f"{NAMES.get(m, m)}{' (lower is better)' if m in ('fid', 'kid') else ''}")
            ax.set_title(operator, fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
            for ext in ("png", "pdf"):
                files.append(out / f"{m}_{slug(operator)}.{ext}")
                fig.savefig(files[-1], dpi=150, bbox_inches="tight")
            plt.close(fig)
    return files


def _pick(nfes: list[int], wanted: int | None) -> int:
    """The largest budget <= ``wanted`` (default: the largest), else the smallest."""
    nfes = sorted(nfes)
    if wanted is None:
        return nfes[-1]
    below = [n for n in nfes if n <= wanted]
    return below[-1] if below else nfes[0]


def image_grids(run_dir: str | os.PathLike, out: str | os.PathLike, *, nfe: int | None = None,
                images: int = GRID_IMAGES) -> list[Path]:
    """``grid_<operator>.png`` per operator (first seed) from a run folder's PNGs; returns the files.

    Rows: the first ``images`` images that have a saved degraded input and ground truth (the runner keeps
    those for its first images). Columns: degraded (nearest-neighbour upsampled when smaller), each
    method at the budget :func:`_pick` chooses for ``nfe``, ground truth. ``grid_<operator>.txt`` lists
    the columns.
    """
    from benchmarks.generation import image_grid
    from restore.app.io import output_path, read_image, write_png

    run_dir, out = Path(run_dir), Path(out)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise ValueError(f"{run_dir} has no run.json: not a finished `restore-bench run` folder")
    meta = json.loads(meta_path.read_text())
    seed = meta["suite"]["seeds"][0]
    files = []
    for operator, by_seed in meta["degraded"].items():
        degraded = run_dir / by_seed[str(seed)]
        ids = [i for i in meta["grid_ids"] if output_path(degraded, i).is_file()
               and output_path(run_dir / "reference", i).is_file()][:images]
        cells = [c for c in meta["cells"] if c["operator"] == operator and c["seed"] == seed]
        columns, chosen = ["degraded"], []
        for label in dict.fromkeys(c["label"] for c in cells):
            mine = [c for c in cells if c["label"] == label]
            budget = _pick([c["nfe"] for c in mine], nfe)
            cell = next(c for c in mine if c["nfe"] == budget)
            if all(output_path(run_dir / cell["dir"], i).is_file() for i in ids):
                chosen.append(cell)
                columns.append(f"{label} (NFE {budget})" if budget else label)
        columns.append("ground truth")
        if not ids:
            continue
        tiles = []
        for i in ids:
            tiles.append(read_image(output_path(degraded, i)))
            tiles += [read_image(output_path(run_dir / c["dir"], i)) for c in chosen]
            tiles.append(read_image(output_path(run_dir / "reference", i)))
        grid = image_grid(torch.stack(tiles), nrow=len(columns))
        out.mkdir(parents=True, exist_ok=True)
        files.append(write_png(grid, out / f"grid_{slug(operator)}.png"))
        legend = "columns: " + " | ".join(columns) + "\nrows: " + " ".join(ids) + "\n"
        (out / f"grid_{slug(operator)}.txt").write_text(legend)
    return files
