"""One self-contained HTML page per benchmark run (`restore-bench report RUN_DIR`).

Sections, in order: the run's summary (suite, images, cells, wall time, failures), the tables per operator
(mean ± 95 % CI, best per column in bold, from :mod:`benchmarks.tables`), the metric-vs-NFE plots and the labelled
image grids (:mod:`benchmarks.plots`, embedded as base64 PNG so the page is one file that can be mailed or
archived), the tuning record when the suite's values were tuned (:mod:`benchmarks.tune`), the fairness report of
the trained models (:mod:`benchmarks.fairness`), the resolved suite configuration and the provenance (versions, git
state, machine). The LaTeX tables are written next to it (``tables.tex``, booktabs, for ``\\input`` into a paper).

The page uses no script and no external resource.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from benchmarks.fairness import render_fairness
from benchmarks.plots import image_grids, metric_plots
from benchmarks.tables import load_results, render
from restore.runtime.files import write_text_atomic

__all__ = ["write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    caption = html.escape(path.stem.replace("_", " "))
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _tuning_section(meta: dict) -> list[str]:
    """The suite's tuning record (when its values were tuned): how, and per cell default vs tuned on the held-out
    images; warnings when the run loaded other weights than the tuning did."""
    from benchmarks.tune import tuning_frame, tuning_summary

    record = meta["suite"].get("tuning")
    if not record:
        return []
    warnings = "".join(f"<p><b>Warning:</b> {html.escape(w)}</p>" for w in meta["summary"].get("tuning_mismatches", []))
    return [f"<h2>Tuning</h2><p>{html.escape(tuning_summary(record))}. Cells marked (tuned) use the values chosen "
            f"there.</p>{warnings}" + tuning_frame(record).to_html(index=False, float_format="{:.3f}".format)]


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 grid_nfe: int | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``tables.tex`` for the run folder ``run_dir`` into ``out`` (default:
    ``run_dir/report``); the figures go to ``out/figures``. Returns the two files."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise ValueError(f"{run_dir} has no run.json: not a `restore-bench run` folder")
    meta = json.loads(meta_path.read_text())
    frame = load_results(run_dir)
    figures = out / "figures"
    plots = [f for f in metric_plots(frame, figures) if f.suffix == ".png"]
    grids = [f for f in image_grids(run_dir, figures, nfe=grid_nfe) if f.suffix == ".png"]

    summary = meta["summary"]
    facts = {"suite": meta["suite"]["name"], "dataset": meta["suite"]["dataset"], "images": meta["images"],
             "cells": summary.get("cells")}
    if meta.get("finished", True):
        facts.update({"images restored (last session)": summary.get("images_restored"),
                      "wall seconds (last session)": summary.get("wall_seconds"),
                      "failures": len(summary.get("failures", []))})
    else:
        facts["state"] = "in progress or stopped: the cells restored so far (a partial cell averages its images)"
    sections = [
        f"<h1>Benchmark report: {html.escape(str(facts['suite']))}</h1>",
        "<h2>Run</h2><table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                                         for k, v in facts.items()) + "</table>",
        "<h2>Tables</h2><p>Mean ± 95 % confidence interval over images (and seeds); best per column in bold; "
        "NFE as counted.</p>" + render(frame, "html"),
        "<h2>Plots</h2>" + "".join(_image(p) for p in plots),
        "<h2>Image grids</h2>" + "".join(_image(g) for g in grids),
        *_tuning_section(meta),
        "<h2>Fairness</h2><pre>" + html.escape(render_fairness(meta["models"])) + "</pre>",
        "<h2>Configuration</h2><pre>" + html.escape(json.dumps(meta["suite"], indent=1)) + "</pre>",
        "<h2>Provenance</h2><pre>" + html.escape(json.dumps(meta["environment"], indent=1)) + "</pre>",
    ]
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(str(facts['suite']))} report</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    out.mkdir(parents=True, exist_ok=True)
    report, tex = out / "report.html", out / "tables.tex"
    write_text_atomic(page, report)
    write_text_atomic(render(frame, "latex") + "\n", tex)
    return report, tex
