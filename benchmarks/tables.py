"""Paper tables from the long results frame (docs/design.md#results-table): method x NFE rows by metric columns,
per operator.

:func:`summarize` reduces the long frame to one numeric row per (operator, method, NFE budget):
per-image metrics as mean and 95% confidence half-width (Student t over every image x seed value),
set metrics (FID, KID; ``image_id == "*"``) as the mean over seeds (with a CI when there are several),
the counted NFE (forward and backward), wall seconds per image and the model's parameter count.
:func:`render` formats it as Markdown, LaTeX (booktabs) or CSV, bolding the best mean of each metric
column per operator (direction from :data:`benchmarks.metrics.METRICS`).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from benchmarks.metrics import METRICS

NAMES = {"psnr": "PSNR", "ssim": "SSIM", "cpsnr": "cons-PSNR", "fid": "FID", "kid": "KID"}


def load_results(path: str | os.PathLike) -> pd.DataFrame:
    """The long results frame from a run folder (its results.csv, else, or while a session is adding to the run,
    its journals), a .csv or a .jsonl."""
    from benchmarks.runner import results_frame

    path = Path(path)
    if path.is_dir():
        meta = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}
        if (path / "results.csv").is_file() and meta.get("finished", True):
            frame = pd.read_csv(path / "results.csv")
        else:  # the run's current cells only, under their labels
            frame = results_frame(path, {c["key"]: c["label"] for c in meta["cells"]} if meta else None)
    elif path.suffix == ".jsonl":
        frame = pd.read_json(path, lines=True)
    elif path.suffix == ".csv":
        frame = pd.read_csv(path)
    else:
        raise ValueError(f"{path}: expected a run folder, a results .csv or a .jsonl")
    missing = {"operator", "method", "nfe", "metric", "value", "image_id"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: not a results table, missing columns {', '.join(sorted(missing))}")
    if frame.empty:
        raise ValueError(f"{path}: no results yet")
    frame["image_id"] = frame["image_id"].astype(str)
    if "nfe_budget" not in frame:
        frame["nfe_budget"] = frame["nfe"]
    return frame


def load_runs(paths: list[str | os.PathLike]) -> pd.DataFrame:
    """The results of several runs as one frame (e.g. a suite and its tuned suite, compared in one table). A cell
    that two runs share (the same operator, method label, NFE budget, seed, image and metric) is kept once;
    ValueError if its values differ (two runs used one label for different settings)."""
    frame = pd.concat([load_results(p) for p in paths], ignore_index=True)
    key = [c for c in ("operator", "method", "nfe_budget", "seed", "image_id", "metric") if c in frame]
    frame = frame.drop_duplicates(subset=[*key, "value"])
    clash = frame[frame.duplicated(subset=key, keep=False)]
    if len(clash):
        row = clash.iloc[0]
        raise ValueError(f"the runs disagree on {row['method']} at NFE {row['nfe_budget']} on {row['operator']} "
                         f"({row['metric']} of {row['image_id']}): give different settings different labels")
    return frame.reset_index(drop=True)


def select(frame: pd.DataFrame, metrics: list[str] | None = None, complete: bool = False) -> pd.DataFrame:
    """With ``complete`` only the cells (operator, method, NFE budget) that have a value of every set metric (image id
    ``"*"``: FID, KID) the frame holds; then the rows of ``metrics`` only (all when empty), in that order (the
    tables' column order follows the rows')."""
    if complete:
        cell = ["operator", "method", "nfe_budget"]
        scored = frame[frame.image_id == "*"]
        has_all = scored.groupby(cell).metric.nunique().loc[lambda n: n == scored.metric.nunique()].index
        frame = frame[frame.set_index(cell).index.isin(has_all)]
        if frame.empty:
            raise ValueError("no cell has its set metrics (FID, KID) yet")
    if metrics:
        unknown = [m for m in metrics if m not in set(frame.metric)]
        if unknown:
            raise ValueError(f"no metric {', '.join(unknown)} in these results; they hold "
                             f"{', '.join(dict.fromkeys(frame.metric))}")
        order = {m: k for k, m in enumerate(metrics)}
        frame = frame[frame.metric.isin(metrics)].sort_values("metric", key=lambda m: m.map(order), kind="stable")
    return frame


def ci95(values: np.ndarray) -> float:
    """Half-width of the 95% Student-t confidence interval of the mean (NaN for fewer than 2 values)."""
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (operator, method, NFE budget): operators and methods in order of first appearance, each
    method's budgets ascending together (however its cells were run); columns ``operator, method, nfe,
    nfe_backward, <metric>_mean, <metric>_ci95, ..., seconds_per_image, params``."""
    metrics = list(dict.fromkeys(frame.metric))
    out = []
    for (operator, method, budget), g in frame.groupby(["operator", "method", "nfe_budget"], sort=False):
        per_image = g[g.image_id != "*"]
        basis = per_image if len(per_image) else g
        row = {"operator": operator, "method": method, "nfe_budget": budget, "nfe": basis.nfe.mean(),
               "nfe_backward": basis.nfe_backward.mean() if "nfe_backward" in basis else 0.0}
        for m in metrics:
            v = g[g.metric == m].value.to_numpy(dtype=float)
            row[f"{m}_mean"] = float(np.nanmean(v)) if len(v) and not np.isnan(v).all() else math.nan
            row[f"{m}_ci95"] = ci95(v)
        if len(per_image) and "seconds" in per_image:
            keys = [c for c in ("image_id", "seed") if c in per_image]
            row["seconds_per_image"] = per_image.drop_duplicates(subset=keys).seconds.mean()
        else:
            row["seconds_per_image"] = math.nan
        row["params"] = int(g.params.max()) if "params" in g and g.params.notna().any() else 0
        out.append(row)
    operators, methods = ({k: i for i, k in enumerate(dict.fromkeys(frame[c]))} for c in ("operator", "method"))
    return pd.DataFrame(sorted(out, key=lambda r: (operators[r["operator"]], methods[r["method"]], r["nfe_budget"])))


def _fmt(v: float, ci: float = math.nan) -> str:
    if math.isnan(v):
        return "–"
    digits = _digits(v)
    text = f"{v:.{digits}f}"
    return text if math.isnan(ci) else f"{text} ± {ci:.{digits}f}"


def _params(n: int) -> str:
    if not n:
        return "–"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _digits(v: float) -> int:
    return 2 if abs(v) >= 1 else 4


def _best(col: pd.Series, metric: str) -> pd.Series:
    """Rows holding the best value as displayed (ties, at the printed precision, all win)."""
    higher = METRICS[metric].higher_is_better if metric in METRICS else True
    col = col.map(lambda v: v if math.isnan(v) else round(v, _digits(v)))
    target = col.max() if higher else col.min()
    return col == target if not math.isnan(target) else col != col


_BOLD = {"md": lambda s: f"**{s}**", "latex": lambda s: f"\\textbf{{{s}}}", "html": lambda s: f"<b>{s}</b>"}


def _tables(summary: pd.DataFrame, style: str) -> list[tuple[str, pd.DataFrame]]:
    """Per operator: a frame of display strings, best values wrapped in the bold markup of ``style``."""
    metrics = [c[:-5] for c in summary.columns if c.endswith("_mean")]
    arrows = ("$\\uparrow$", "$\\downarrow$") if style == "latex" else ("↑", "↓")
    bold = _BOLD[style]
    out = []
    for operator, s in summary.groupby("operator", sort=False):
        methods = s.method.map(html.escape) if style == "html" else s.method
        # a method that spent less than its budget shows both, so two budgets never look like one cell
        table = pd.DataFrame({"method": methods, "NFE": [f"{v:g}" if v == b else f"{v:g} (of {b:g})"
                                                         for v, b in zip(s.nfe, s.nfe_budget)]})
        if (s.nfe_backward > 0).any():
            table["NFE bwd"] = [f"{v:g}" for v in s.nfe_backward]
        for m in metrics:
            if s[f"{m}_mean"].isna().all():
                continue
            best = _best(s[f"{m}_mean"], m)
            higher = METRICS[m].higher_is_better if m in METRICS else True
            cells = [_fmt(v, c) for v, c in zip(s[f"{m}_mean"], s[f"{m}_ci95"])]
            table[f"{NAMES.get(m, m)} {arrows[0] if higher else arrows[1]}"] = [
                bold(c) if b else c for c, b in zip(cells, best)]
        table["s/image"] = ["–" if math.isnan(v) else f"{v:.3g}" for v in s.seconds_per_image]
        table["params"] = [_params(n) for n in s.params]
        out.append((operator, table.reset_index(drop=True)))
    return out


def _latex_escape(text: str) -> str:
    return _latex_ci(text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%")
                     .replace("&", "\\&").replace("#", "\\#").replace("–", "--"))


def _latex_ci(cell: str) -> str:
    """``mean ± ci`` with the interval in a smaller font, as papers print it."""
    return re.sub(r" ± (\S+?)(\}?)$", r" {\\scriptsize $\\pm$ \1}\2", cell)


def render(frame: pd.DataFrame, fmt: str = "md") -> str:
    """The tables of a long results frame as ``md`` (one Markdown table per operator), ``html``, ``latex``
    (booktabs tabulars, the CI in a smaller font) or ``csv`` (the numeric :func:`summarize` frame)."""
    summary = summarize(frame)
    if fmt == "csv":
        return summary.to_csv(index=False).rstrip("\n")
    if fmt == "md":
        return "\n\n".join(f"### {op}\n\n{t.to_markdown(index=False, disable_numparse=True)}"
                           for op, t in _tables(summary, "md"))
    if fmt == "html":
        return "\n".join(f"<h3>{html.escape(op)}</h3>\n" + t.to_html(index=False, escape=False, border=0)
                         for op, t in _tables(summary, "html"))
    if fmt == "latex":
        parts = []
        for op, t in _tables(summary, "latex"):
            header = " & ".join(c if "$" in c else _latex_escape(c) for c in t.columns)
            body = "\n".join(" & ".join(_latex_escape(v) if "\\textbf" not in v else
                                        _latex_ci(v.replace("–", "--")) for v in row) + " \\\\"
                             for row in t.astype(str).itertuples(index=False))
            parts.append("\n".join([
                "\\begin{table}[t]", "\\centering", f"\\caption{{{_latex_escape(op)}}}",
                f"\\begin{{tabular}}{{ll{'r' * (len(t.columns) - 2)}}}", "\\toprule", header + " \\\\", "\\midrule",
                body, "\\bottomrule", "\\end{tabular}", "\\end{table}"]))
        return "\n\n".join(parts)
    raise ValueError(f"unknown table format {fmt!r}; valid: md, html, latex, csv")
