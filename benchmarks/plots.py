"""Figures from a benchmark run: metric-vs-NFE curves and labelled image grids per operator (matplotlib Agg).

* :func:`metric_plots`: for each operator and each of FID, PSNR and consistency-PSNR present in the
  results, one figure with one line per method (mean over images / seeds against the counted NFE on a log
  axis, a band for the per-image 95 % confidence interval); network-free methods (0 NFE) cannot sit on a log
  axis and are drawn as dashed horizontal lines. Each method keeps one colour in every figure of a run
  (:func:`method_colours`). Written as PNG and PDF.
* :func:`image_grids`: for each operator, rows = the first images of the run (labelled with their ids),
  columns = degraded input, each method at one NFE, ground truth (headed with the method and its NFE),
  each 32 px image drawn large with nearest-neighbour pixels; optionally a zoomed crop of every cell under
  each row. Written as PNG and PDF, with the column order also in a ``.txt`` companion.
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


def method_colours(methods) -> dict[str, str]:
    """One colour per method, in first-seen order, so a method looks the same in every figure of a run."""
    return {m: f"C{k % 10}" for k, m in enumerate(dict.fromkeys(methods))}


def metric_plots(frame: pd.DataFrame, out: str | os.PathLike, metrics=PLOTTED) -> list[Path]:
    """``<metric>_<operator>.png/.pdf`` in ``out`` for every operator and plotted metric; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(frame)
    colour = method_colours(summary["method"])
    files = []
    for operator, s in summary.groupby("operator", sort=False):
        for m in metrics:
            col = f"{m}_mean"
            if col not in s or s[col].isna().all():
                continue
            fig, ax = plt.subplots(figsize=(5.5, 3.2))
            curves = s[(s.nfe > 0) & s[col].notna()]
            for method, g in curves.groupby("method", sort=False):
                g = g.sort_values("nfe")
                ci = g[f"{m}_ci95"].fillna(0)
                ax.plot(g.nfe, g[col], marker="o", ms=4, label=method, color=colour[method])
                ax.fill_between(g.nfe, g[col] - ci, g[col] + ci, color=colour[method], alpha=0.15, lw=0)
            for j, row in enumerate(s[(s.nfe == 0) & s[col].notna()].itertuples()):
                ax.axhline(getattr(row, col), ls=("--", ":", "-.")[j % 3], lw=1.2, color=colour[row.method],
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


def labelled_grid(rows: list[list[torch.Tensor]], columns: list[str], row_labels: list[str], dst: Path, *,
                  zoom: tuple[int, int, int] | None = None, cell_inches: float = 1.3) -> list[Path]:
    """Draw ``rows`` of images ([-1, 1], CHW) under the ``columns`` headers with ``row_labels`` on the left, as
    ``dst`` with the suffixes .png and .pdf. ``zoom = (x, y, size)``: a red square marks that crop in every cell and
    a second row under each image row shows it enlarged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    per_image = 2 if zoom else 1
    n_rows, n_cols = len(rows) * per_image, len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols, cell_inches * n_rows + 0.4),
                             squeeze=False)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        for c, image in enumerate(images):
            pixels = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).float().cpu().numpy()
            views = [(axes[r * per_image, c], pixels)]
            if zoom:
                x, y, size = zoom
                views.append((axes[r * per_image + 1, c], pixels[y:y + size, x:x + size]))
                views[0][0].add_patch(Rectangle((x - 0.5, y - 0.5), size, size, fill=False, ec="red", lw=1))
            for ax, view in views:
                ax.imshow(view.squeeze(), interpolation="nearest", cmap="gray" if view.shape[-1] == 1 else None)
                ax.set_xticks([])
                ax.set_yticks([])
        axes[r * per_image, 0].set_ylabel(label, fontsize=8)
        if zoom:
            axes[r * per_image + 1, 0].set_ylabel(f"{label} (zoom)", fontsize=8)
    for c, header in enumerate(columns):
        axes[0, c].set_title(header.replace(" (", "\n("), fontsize=8)
    fig.tight_layout(pad=0.3)
    files = []
    for ext in ("png", "pdf"):
        files.append(dst.with_suffix(f".{ext}"))
        fig.savefig(files[-1], dpi=150)
    plt.close(fig)
    return files


def image_grids(run_dir: str | os.PathLike, out: str | os.PathLike, *, nfe: int | None = None,
                images: int = GRID_IMAGES, zoom: tuple[int, int, int] | None = None) -> list[Path]:
    """``grid_<operator>.png/.pdf`` per operator (first seed) from a run folder's PNGs; returns the files.

    Rows: the first ``images`` images that have a saved degraded input and ground truth (the runner keeps
    those for its first images), labelled with their ids. Columns: degraded (nearest-neighbour upsampled when
    smaller), each method at the budget :func:`_pick` chooses for ``nfe``, ground truth, headed with the method
    and its NFE. ``zoom``: see :func:`labelled_grid`. ``grid_<operator>.txt`` lists the columns and rows.
    """
    from restore.app.io import output_path, read_image

    run_dir, out = Path(run_dir), Path(out)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise ValueError(f"{run_dir} has no run.json: not a `restore-bench run` folder")
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
            mine = [c for c in cells if c["label"] == label  # a run in progress: the budgets restored so far
                    and all(output_path(run_dir / c["dir"], i).is_file() for i in ids)]
            if mine:
                budget = _pick([c["nfe"] for c in mine], nfe)
                chosen.append(next(c for c in mine if c["nfe"] == budget))
                columns.append(f"{label} (NFE {budget})" if budget else label)
        columns.append("ground truth")
        if not ids:
            continue
        rows = [[read_image(output_path(degraded, i)),
                 *(read_image(output_path(run_dir / c["dir"], i)) for c in chosen),
                 read_image(output_path(run_dir / "reference", i))] for i in ids]
        out.mkdir(parents=True, exist_ok=True)
        files += labelled_grid(rows, columns, ids, out / f"grid_{slug(operator)}.png", zoom=zoom)
        legend = "columns: " + " | ".join(columns) + "\nrows: " + " ".join(ids) + "\n"
        (out / f"grid_{slug(operator)}.txt").write_text(legend)
    return files
