"""Reports from results: summary statistics, md/latex/csv tables with the best values bold, plots and grids."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy import stats

from benchmarks.cli import main
from benchmarks.runner import run_suite
from benchmarks.suites import parse_suite
from benchmarks.tables import load_runs, render, select, summarize
from restore.app.io import write_png
from restore.methods import register_method


@register_method("report-test-pinv", blind=False, model="none", default_nfe=0)
def _pinv(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    return op.pinv(y)


@register_method("report-test-blur", blind=False, model="none", default_nfe=1)
def _blur(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    """Pseudo-inverse smoothed ``nfe`` times (stands in for a method with an NFE axis)."""
    x = op.pinv(y)
    for _ in range(nfe):
        x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x


def frame() -> pd.DataFrame:
    """Two methods x 3 images plus one FID row each, for one operator."""
    rows = []
    for method, nfe, psnr, fid, secs in (("a", 2, [20.0, 22.0, 27.0], 9.0, 0.5),
                                         ("b", 4, [25.0, 25.0, 25.0], 7.0, 1.0)):
        for i, v in enumerate(psnr):
            rows.append(dict(operator="jpeg:quality=10", method=method, nfe=nfe, nfe_budget=nfe, nfe_backward=0, seed=0,
                             image_id=f"im{i}", metric="psnr", value=v, seconds=secs, params=1_500_000))
        rows.append(dict(operator="jpeg:quality=10", method=method, nfe=nfe, nfe_budget=nfe, nfe_backward=0, seed=0,
                         image_id="*", metric="fid", value=fid, seconds=3.0, params=1_500_000))
    return pd.DataFrame(rows)


def test_summary_statistics():
    s = summarize(frame()).set_index("method")
    a = np.array([20.0, 22.0, 27.0])
    assert s.loc["a", "psnr_mean"] == pytest.approx(a.mean())
    assert s.loc["a", "psnr_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * a.std(ddof=1) / np.sqrt(3))
    assert s.loc["b", "psnr_ci95"] == 0 and np.isnan(s.loc["a", "fid_ci95"])  # one FID per cell and seed
    assert s.loc["b", "fid_mean"] == 7.0 and s.loc["a", "seconds_per_image"] == 0.5 and s.loc["a", "nfe"] == 2


def test_summary_lists_each_methods_budgets_together_whatever_the_run_order():
    """The runner runs low budgets of every method first; a table still lists a method's budgets in a block."""
    runs = frame()
    late = runs.assign(nfe_budget=runs.nfe_budget * 4, nfe=runs.nfe * 4)  # a: 2, b: 4, then a: 8, b: 16
    order = summarize(pd.concat([runs, late], ignore_index=True))
    assert list(zip(order.method, order.nfe_budget)) == [("a", 2), ("a", 8), ("b", 4), ("b", 16)]


def test_markdown_latex_csv():
    md = render(frame(), "md")
    lines = md.splitlines()
    assert lines[0] == "### jpeg:quality=10" and "PSNR ↑" in lines[2] and "FID ↓" in lines[2]
    row_a, row_b = (next(line for line in lines if line.startswith(f"| {m} ")) for m in "ab")
    assert "| 23.00 ± 8.96 " in row_a and "**25.00 ± 0.00**" in row_b  # higher PSNR wins
    assert "**7.00**" in row_b and "| 9.00 " in row_a  # lower FID wins
    tied = frame()
    tied.loc[tied.metric == "fid", "value"] = 7.001  # equal at the printed precision: both bold
    assert render(tied, "md").count("**7.00**") == 2
    assert "1.5M" in row_a and "0.5" in row_a
    tex = render(frame(), "latex")
    assert "\\toprule" in tex and "\\textbf{7.00}" in tex and "$\\pm$" in tex and "$\\downarrow$" in tex
    csv = pd.read_csv(io.StringIO(render(frame(), "csv")))
    assert list(csv.method) == ["a", "b"] and {"psnr_mean", "psnr_ci95", "fid_mean", "params"} <= set(csv.columns)
    assert "{\\scriptsize $\\pm$ 8.96}" in tex and "\\textbf{25.00 {\\scriptsize $\\pm$ 0.00}}" in tex
    page = render(frame(), "html")
    assert "<h3>jpeg:quality=10</h3>" in page and "<b>7.00</b>" in page and "<table" in page
    short = frame()
    short.loc[short.method == "b", "nfe_budget"] = 5  # spent 4 of a budget of 5
    assert "| 4 (of 5) |" in render(short, "md")
    with pytest.raises(ValueError, match="valid: md, html, latex, csv"):
        render(frame(), "rst")


def test_several_runs_make_one_table(tmp_path):
    """A suite and its tuned suite side by side: the cells they share are kept once; a label that means different
    settings in two runs is refused."""
    base, tuned = frame(), frame()
    tuned.loc[tuned.method == "b", "method"] = "b (tuned)"
    tuned.loc[tuned.method == "b (tuned)", "value"] += 1.0
    base.to_csv(tmp_path / "base.csv", index=False)
    tuned.to_csv(tmp_path / "tuned.csv", index=False)
    both = load_runs([tmp_path / "base.csv", tmp_path / "tuned.csv"])
    assert len(both) == len(base) + (tuned.method == "b (tuned)").sum()
    assert list(summarize(both).method) == ["a", "b", "b (tuned)"]
    clash = frame()
    clash.loc[clash.method == "a", "value"] += 0.5
    clash.to_csv(tmp_path / "clash.csv", index=False)
    with pytest.raises(ValueError, match="the runs disagree on a at NFE 2"):
        load_runs([tmp_path / "base.csv", tmp_path / "clash.csv"])


def test_select_metrics_in_order_and_only_scored_cells(tmp_path):
    """`table --metrics fid,psnr --complete`: those columns in that order; a cell without its FID yet is left out."""
    runs = frame()
    runs = runs[~((runs.method == "b") & (runs.metric == "fid"))]  # b restored, its FID not computed yet
    header = render(select(runs, ["fid", "psnr"]), "md").splitlines()[2]
    assert header.index("FID") < header.index("PSNR")
    assert list(summarize(select(runs, complete=True)).method) == ["a"]
    assert list(summarize(select(runs)).method) == ["a", "b"]
    with pytest.raises(ValueError, match="no metric kid in these results; they hold psnr, fid"):
        select(runs, ["psnr", "kid"])
    runs.to_csv(tmp_path / "r.csv", index=False)
    result = CliRunner().invoke(main, ["table", str(tmp_path / "r.csv"), "--complete", "--metrics", "psnr",
                                       "--format", "csv"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.output))
    assert list(table.method) == ["a"] and "fid_mean" not in table


def test_table_and_plot_commands_write_files(tmp_path):
    folder = tmp_path / "images"
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for i in range(3):
        write_png(x[i], folder / f"im{i}.png")
    suite = parse_suite({"dataset": str(folder), "operators": ["box:size=8", "down:factor=2,kernel=avg"],
                         "metrics": ["psnr", "cpsnr"],
                         "methods": [{"name": "report-test-pinv", "nfe": [0]},
                                     {"name": "report-test-blur", "nfe": [1, 2, 4]}]},
                        "r")
    run_suite(suite, tmp_path / "run", progress=False)
    runner = CliRunner()
    result = runner.invoke(main, ["table", str(tmp_path / "run"), "--format", "latex",
                                  "--out", str(tmp_path / "t.tex")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.tex").read_text().count("\\begin{tabular}") == 2
    result = runner.invoke(main, ["table", str(tmp_path / "run" / "results.csv")])
    assert result.exit_code == 0 and "### down:factor=2,kernel=avg" in result.output
    low = runner.invoke(main, ["table", str(tmp_path / "run"), "--max-nfe", "2", "--format", "csv"])
    assert low.exit_code == 0, low.output
    assert sorted(pd.read_csv(io.StringIO(low.output)).nfe_budget.unique()) == [0, 1, 2]
    none = runner.invoke(main, ["table", str(tmp_path / "run"), "--max-nfe", "0", "--format", "csv"])
    assert list(pd.read_csv(io.StringIO(none.output)).method.unique()) == ["report-test-pinv"]
    result = runner.invoke(main, ["plot", str(tmp_path / "run"), "--grid-nfe", "2"])
    assert result.exit_code == 0, result.output
    figures = tmp_path / "run" / "figures"
    for name in ("psnr_box_size_8", "cpsnr_down_factor_2_kernel_avg", "grid_box_size_8"):
        assert (figures / f"{name}.png").stat().st_size > 1000 and (figures / f"{name}.pdf").stat().st_size > 1000
    # 3 rows x 4 columns (degraded, 2 methods, truth) of 1.3-inch cells at 150 dpi: each 32 px image drawn large
    grid = np.asarray(Image.open(figures / "grid_down_factor_2_kernel_avg.png"))
    assert grid.shape[0] >= 3 * 150 and grid.shape[1] >= 4 * 150
    assert "report-test-blur (NFE 2)" in (figures / "grid_down_factor_2_kernel_avg.txt").read_text()
    zoomed = runner.invoke(main, ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "z"), "--grid-zoom",
                                  "4,4,8"])
    assert zoomed.exit_code == 0, zoomed.output
    assert np.asarray(Image.open(tmp_path / "z" / "grid_box_size_8.png")).shape[0] > 1.8 * grid.shape[0]
    bad = runner.invoke(main, ["plot", str(tmp_path / "run"), "--grid-zoom", "4,4"])
    assert bad.exit_code != 0 and "X,Y,SIZE" in bad.output
    result = runner.invoke(main, ["table", str(tmp_path / "nothing.csv")])
    assert result.exit_code != 0 and "Traceback" not in result.output


def _browser() -> str | None:
    """Headless Chromium, or a skip (a failure where REQUIRE_BROWSER=1, as .ci/run sets)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail("no Chromium on PATH and REQUIRE_BROWSER=1")
    pytest.skip("no Chromium on PATH")


def test_report_renders_in_a_headless_browser(tmp_path):
    browser = _browser()
    folder = tmp_path / "images"
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for i in range(2):
        write_png(x[i], folder / f"im{i}.png")
    suite = parse_suite({"dataset": str(folder), "operators": ["box:size=8"], "metrics": ["psnr", "cpsnr"],
                         "methods": [{"name": "report-test-pinv", "nfe": [0]},
                                     {"name": "report-test-blur", "nfe": [1, 2]}],
                         "tuning": {"objective": "psnr", "trials_per_cell": 3, "held_out": {"images": 2},
                                    "cells": [{"method": "report-test-blur", "operator": "box:size=8", "nfe": 1,
                                               "trials": 3, "failed": 0, "best": 21.5, "default": 20.25,
                                               "best_params": {"k": 0.123456}, "default_params": {"k": 1.0}}]}},
                        "browser")
    run_suite(suite, tmp_path / "run", progress=False)
    result = CliRunner().invoke(main, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    page = tmp_path / "run" / "report" / "report.html"
    text = page.read_text()
    for section in ("Tables", "Plots", "Image grids", "Tuning", "Fairness", "Configuration", "Provenance"):
        assert f"<h2>{section}</h2>" in text
    assert "<td>k=0.123</td>" in text and "<td>20.250</td>" in text  # the tuned cell: chosen values, default score
    assert "src=\"http" not in text and "<script" not in text  # self-contained, no script
    assert "\\toprule" in (tmp_path / "run" / "report" / "tables.tex").read_text()

    # The browser loads the page with a probe that counts the images it could decode.
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", "<script>addEventListener('load', () => document.body.setAttribute("
                                  "'data-images', [...document.images].filter(i => i.naturalWidth > 0).length + '/' "
                                  "+ document.images.length));</script></body>"))
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
            "--enable-logging=stderr", "--v=0"]
    done = subprocess.run([*args, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    n_images = text.count("<img ")
    assert n_images >= 3 and f'data-images="{n_images}/{n_images}"' in done.stdout, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    shot = tmp_path / "shot.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()], capture_output=True,
                   timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1600, 1200) and pixels.std() > 10  # rendered content, not a blank page
