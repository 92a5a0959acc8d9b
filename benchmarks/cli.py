"""`restore-bench` command line: run benchmark suites and turn results into tables and plots."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import click

from restore.app.cli import acceleration_options


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if out and min(out) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


def _bdia_gamma(ctx, param, value: str) -> float | str:
    """BDIA's gamma: a number in (0, 1], or "obelm"."""
    if value == "obelm":
        return value
    try:
        gamma = float(value)
    except ValueError:
        gamma = math.nan
    if not 0.0 < gamma <= 1.0:
        raise click.BadParameter(f"expected a number in (0, 1] or obelm, got {value!r}")
    return gamma


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="bcm-restore")
def main() -> None:
    """Benchmark restoration methods: suites x operators x methods x NFE budgets.

    \b
    Examples:
      restore-bench list
      restore-bench models cifar10-100
      restore-bench run quick --out results/quick
      restore-bench table results/quick --format md
      restore-bench plot results/quick --out results/quick/figures
      restore-bench generation bcm-cifar10 --out results/bcm-gen --n 1000 --nfe 1,2,3,4
    """


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _model_override(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        alias, eq, path = v.partition("=")
        if not eq or not alias or not path:
            raise click.BadParameter(f"expected ALIAS=PATH, got {v!r}")
        out[alias] = path
    return out


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(as_json: bool) -> None:
    """List the built-in suites (run one with `restore-bench run NAME`).

    \b
    Example:
      restore-bench list --json
    """
    from benchmarks.suites import list_suites

    suites = list_suites()
    if as_json:
        click.echo(json.dumps(suites, indent=1))
        return
    for s in suites:
        click.echo(f"{s['name']:<18} {s['description']}")


@main.command()
@click.argument("suite")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: results/SUITE); an existing one is resumed.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images (smoke tests).")
@click.option("--model", "models", multiple=True, callback=_model_override, metavar="ALIAS=PATH",
              help="Replace a model alias of the suite's [models] table (repeatable).")
@click.option("--data", default=None, help="Run on this dataset (name or path) instead of the suite's.")
@click.option("--device", default=None,
              help="Torch device (default: cuda if available, else cpu; torchrun: cuda:LOCAL_RANK).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Rich progress bars on stderr.")
@click.option("--dry-run", is_flag=True,
              help="Print every cell's counted NFE, GFLOP and estimated time instead of running; writes nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the estimate as JSON.")
@acceleration_options
def run(suite: str, out: Path | None, limit: int | None, models: dict, data: str | None, device: str | None,
        progress: bool, dry_run: bool, as_json: bool, acceleration) -> None:
    """Run the benchmark SUITE (a built-in name or a TOML file), resuming what --out already holds.

    Writes results.csv (long format: one row per image x cell x metric; FID/KID rows have image_id *),
    restored PNGs per cell, cached degraded inputs and run.json (resolved config and environment).
    Prints a JSON summary on stdout. Shard over processes with
    `torchrun --nproc_per_node=N -m benchmarks run ...`.

    --dry-run prints the cost instead and writes nothing (benchmarks.runner.cost): per cell the NFE per image
    the counter will report, GFLOP per network forward (torch's FLOP counter; a backward counts as 2 forwards)
    and in total, and the time at the network throughput measured on this device. When --out holds a run, also
    how many images each cell has restored, which cells are complete, and what is left to spend.

    \b
    Examples:
      restore-bench run quick --dry-run
      restore-bench run quick --out results/quick
      restore-bench run my-suite.toml --out results/mine --limit 16
      restore-bench run bcm-paper-jpeg --model bcm=bcm_imagenet64.safetensors --data val_data.npz --bf16
    """
    from benchmarks.runner import run_suite
    from benchmarks.suites import load_suite

    if as_json and not dry_run:
        raise click.UsageError("--json goes with --dry-run (a run prints its JSON summary anyway)")
    try:
        spec = load_suite(suite)
        if models:
            spec = spec.with_models(models)
        if data:
            spec = spec.with_dataset(data)
        out = out or Path("results") / spec.name
        if dry_run:
            _dry_run(spec, out, limit, device, acceleration, as_json)
            return
        summary = run_suite(spec, out, limit=limit, device=device, progress=progress,
                            acceleration=acceleration)
    except (ValueError, OSError) as e:
        raise _fail(e) from None
    if summary["rank"] == 0:
        click.echo(json.dumps(summary))
        for v in summary["fairness_violations"]:
            click.echo(f"warning: fairness rule broken: {v}", err=True)
    if summary["failures"]:
        raise click.ClickException(f"{len(summary['failures'])} cell(s) failed; first: {summary['failures'][0]}")


def _dry_run(suite, out: Path, limit: int | None, device: str | None, acceleration, as_json: bool) -> None:
    """Print the cost estimate of ``suite``, less what the output folder ``out`` already holds (writes nothing)."""
    from benchmarks.runner import Finished, make_plan
    from benchmarks.runner.cost import estimate_cost
    from restore.runtime import distributed

    finished = Finished.read(out) if (out / "records").is_dir() else None
    cost = estimate_cost(make_plan(suite, limit), distributed.setup(device)[2], acceleration, finished)
    click.echo(json.dumps(cost.to_json(), indent=1) if as_json else cost.render())


@main.command()
@click.argument("suite")
@click.option("--model", "models", multiple=True, callback=_model_override, metavar="ALIAS=PATH",
              help="Replace a model alias of the suite's [models] table (repeatable).")
@click.option("--reference", metavar="MODEL", help="Compare with this model (default: the suite's first BCM).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when a rule is broken.")
def models(suite: str, models: dict, reference: str | None, as_json: bool, strict: bool) -> None:
    """The trained models of SUITE and the fairness rules they keep: parameters (total and backbone), training
    data split, images seen, training compute (GFLOP; "not recorded" for cards from before it was measured), which
    budget each matches (images or compute) and training time, against a reference model (README, "Fairness rules").

    \b
    Examples:
      restore-bench models cifar10-100
      restore-bench models my-suite.toml --model edm=runs/edm/ema.safetensors --strict
    """
    from benchmarks.fairness import fairness_report, render_fairness
    from benchmarks.suites import load_suite

    try:
        spec = load_suite(suite)
        report = fairness_report(spec.with_models(models).model_refs, reference)
    except (ValueError, OSError) as e:
        raise _fail(e) from None
    click.echo(json.dumps(report, indent=1) if as_json else render_fairness(report))
    if strict and report["violations"]:
        raise SystemExit(1)


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["md", "latex", "csv"]), default="md", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead of stdout.")
@click.option("--max-nfe", type=click.IntRange(min=0), default=None,
              help="Only cells whose NFE budget is at most this; bold marks the best among them.")
@click.option("--metrics", default="", metavar="M1,M2,...",
              help="Only these metric columns (default: every metric of the runs).")
@click.option("--complete", is_flag=True,
              help="Only cells that have every set metric (leaves out a cell whose FID is not computed yet).")
def table(results: tuple[Path, ...], fmt: str, out: Path | None, max_nfe: int | None, metrics: str,
          complete: bool) -> None:
    """Paper tables from RESULTS (run folders or their results.csv): method x NFE by metric, per operator.

    Per-image metrics as mean +- 95% CI, FID/KID per cell, wall time (s/image) and parameter count;
    the best value of each column in bold. Several runs make one table (a cell they share is shown once).

    \b
    Examples:
      restore-bench table results/cifar10-jpeg --format latex --out table.tex
      restore-bench table results/jpeg results/jpeg-tuned    # default and tuned cells side by side
      restore-bench table results/cifar10-jpeg --max-nfe 4   # the low-NFE regime; the input (NFE 0) stays
      restore-bench table results/cifar10-jpeg --complete --metrics psnr,ssim,fid,kid   # scored cells only
    """
    from benchmarks.tables import load_runs, render, select

    try:
        frame = select(load_runs(list(results)), [m for m in metrics.split(",") if m.strip()], complete)
        if max_nfe is not None:
            frame = frame[frame.nfe_budget <= max_nfe]
            if frame.empty:
                raise ValueError(f"no cell of {', '.join(map(str, results))} has an NFE budget <= {max_nfe}")
        text = render(frame, fmt)
    except (ValueError, OSError) as e:
        raise _fail(e) from None
    if out is None:
        click.echo(text)
    else:
        out.write_text(text + "\n")


@main.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Figure folder (default: RESULTS/figures).")
@click.option("--grid-nfe", type=click.IntRange(min=0), default=None,
              help="NFE shown in the image grids: per method the largest budget <= this "
                   "(default: each method's largest).")
@click.option("--grid-images", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rows of the image grids.")
@click.option("--grid-zoom", callback=_int_list, default="", metavar="X,Y,SIZE",
              help="Also show this square crop (left, top, side in pixels) of every grid cell, enlarged.")
def plot(results: Path, out: Path | None, grid_nfe: int | None, grid_images: int, grid_zoom: list[int]) -> None:
    """Figures from the run folder RESULTS: FID / PSNR / consistency-PSNR vs NFE per operator (PNG + PDF,
    one line per method with its 95 % CI band, log NFE axis; network-free methods as horizontal lines; one colour
    per method in every figure) and labelled image grids per operator (PNG + PDF; rows: images, labelled with
    their ids; columns: degraded, each method with its NFE, ground truth).

    \b
    Example:
      restore-bench plot results/quick --grid-nfe 2 --grid-zoom 8,8,12
    """
    if grid_zoom and len(grid_zoom) != 3:
        raise click.BadParameter("give X,Y,SIZE", param_hint="--grid-zoom")
    from benchmarks.plots import image_grids, metric_plots
    from benchmarks.tables import load_results

    out = out or results / "figures"
    try:
        files = metric_plots(load_results(results), out)
        if (results / "run.json").is_file():
            files += image_grids(results, out, nfe=grid_nfe, images=grid_images, zoom=tuple(grid_zoom) or None)
        else:
            click.echo(f"{results} has no run.json (not a run folder): image grids skipped", err=True)
    except (ValueError, OSError) as e:
        raise _fail(e) from None
    click.echo(json.dumps({"files": [str(f) for f in files]}))


@main.command()
@click.argument("suite")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Tuning folder: optuna.journal (resumable studies), trials/, trials.csv, SUITE-tuned.toml.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Trials per (method, operator, NFE) cell, the same for every method (the defaults are trial 0).")
@click.option("--objective", default="psnr", show_default=True,
              help="Metric to optimise (psnr, ssim, cpsnr, fid, kid).")
@click.option("--held-out-images", type=click.IntRange(min=1), default=100, show_default=True,
              help="Held-out images the trials run on.")
@click.option("--held-out-start", type=click.IntRange(min=0), default=None,
              help="First held-out image (default: right after the suite's evaluation images).")
@click.option("--held-out-split", default=None, help="Split of the held-out images (default: the suite's).")
@click.option("--model", "models", multiple=True, callback=_model_override, metavar="ALIAS=PATH",
              help="Tune on these weights for a model alias (repeatable); the tuned suite keeps the suite's "
                   "reference and records their sha256.")
@click.option("--seed", default=0, show_default=True, help="Seed of the TPE sampler.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
@acceleration_options
def tune(suite: str, out: Path, trials: int, objective: str, held_out_images: int, held_out_start: int | None,
         held_out_split: str | None, models: dict[str, str], seed: int, device: str | None, acceleration) -> None:
    """Tune every method of SUITE with the same effort (benchmarks.tune): per (method, operator, NFE) cell, TRIALS
    trials of Optuna's TPE over the space the method declares, on held-out images that never overlap the
    evaluation images; writes OUT/SUITE-tuned.toml, which `restore-bench run` takes as it is.

    \b
    Example:
      restore-bench tune cifar10-jpeg --out results/tune-jpeg --trials 20
      restore-bench run results/tune-jpeg/cifar10-jpeg-tuned.toml --out results/jpeg-tuned
    """
    from benchmarks.suites import load_suite
    from benchmarks.tune import tune_suite

    try:
        dst = tune_suite(load_suite(suite), out, models=models, trials=trials, objective=objective,
                         held_out_images=held_out_images, held_out_start=held_out_start,
                         held_out_split=held_out_split, seed=seed, device=device, acceleration=acceleration,
                         echo=lambda line: click.echo(line, err=True))
    except (ValueError, OSError) as e:
        raise _fail(e) from None
    click.echo(json.dumps({"tuned_suite": str(dst)}))


@main.command()
@click.argument("suite")
@click.option("--format", "fmt", type=click.Choice(["md", "csv"]), default="md", show_default=True)
def tuning(suite: str, fmt: str) -> None:
    """How SUITE was tuned: its [tuning] record (written by `restore-bench tune`) as one line on the protocol and a
    table of every tuned cell with the held-out score of the default and of the chosen values, and both value sets.

    \b
    Examples:
      restore-bench tuning cifar10-jpeg
      restore-bench tuning results/tune-jpeg/cifar10-jpeg-tuned.toml --format csv
    """
    from benchmarks.suites import load_suite
    from benchmarks.tune import tuning_frame, tuning_summary

    try:
        record = load_suite(suite).tuning
        if not record:
            raise ValueError(f"suite {suite!r} has no [tuning] record: it was not tuned (restore-bench tune)")
    except (ValueError, OSError) as e:
        raise _fail(e) from None
    frame = tuning_frame(record)
    if fmt == "csv":
        click.echo(frame.to_csv(index=False).rstrip("\n"))
    else:
        click.echo(f"Objective: {tuning_summary(record)}.\n\n{frame.to_markdown(index=False, floatfmt='.2f')}")


@main.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: RESULTS/report).")
@click.option("--grid-nfe", type=click.IntRange(min=0), default=None, help="NFE shown in the image grids (see plot).")
def report(results: Path, out: Path | None, grid_nfe: int | None) -> None:
    """One self-contained HTML page for the run folder RESULTS (tables with CIs, plots, labelled grids, fairness
    report, configuration, provenance) and its LaTeX tables (tables.tex, booktabs) for \\input into a paper.

    \b
    Example:
      restore-bench report results/quick
    """
    from benchmarks.report import write_report

    try:
        page, tex = write_report(results, out, grid_nfe=grid_nfe)
    except (ValueError, OSError) as e:
        raise _fail(e) from None
    click.echo(json.dumps({"report": str(page), "latex": str(tex)}))


@main.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
def pack(results: Path, archive: Path) -> None:
    """Write what the run folder RESULTS has finished as one small ARCHIVE (.tar.gz; benchmarks.runner.pack):
    journal, run records, the grid images and the restorations still to be scored, but not the other PNGs. Commit
    or carry it; `restore-bench unpack` then `restore-bench run` continues elsewhere, and report / table read it.

    \b
    Example:
      restore-bench pack results/cifar10-jpeg docs/results/cifar10-jpeg/run.tar.gz
    """
    from benchmarks.runner.pack import pack_run

    try:
        click.echo(json.dumps(pack_run(results, archive)))
    except (ValueError, OSError) as e:
        raise _fail(e) from None


@main.command()
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("results", type=click.Path(file_okay=False, path_type=Path))
def unpack(archive: Path, results: Path) -> None:
    """Extract a `restore-bench pack` ARCHIVE into the fresh run folder RESULTS.

    \b
    Example:
      restore-bench unpack docs/results/cifar10-jpeg/run.tar.gz results/cifar10-jpeg
      restore-bench run cifar10-jpeg --out results/cifar10-jpeg    # continues; finished cells are kept
    """
    from benchmarks.runner.pack import unpack_run

    try:
        click.echo(json.dumps(unpack_run(archive, results)))
    except (ValueError, OSError, tarfile.TarError) as e:
        raise _fail(e) from None


@main.command()
@click.argument("model")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--data", default="cifar10", show_default=True, help="Dataset name or path (see restore.datasets).")
@click.option("--reference-split", default="train", show_default=True, help="Split of --data that FID compares with.")
@click.option("--inversion-split", default="test", show_default=True, help="Split of --data whose images are inverted.")
@click.option("--n", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Samples per NFE, reference images and inverted images.")
@click.option("--nfe", "nfes", default="1,2,3,4", show_default=True, callback=_int_list,
              help="Generation NFE budgets (EDM Heun: odd = 2 steps - 1 ending at 0, even = 2 per step).")
@click.option("--inversion-nfe", "inversion_nfes", default="1,2", show_default=True, callback=_int_list,
              help="Inversion NFE budgets, the way up (EDM: a multiple of the sampler's NFE per step); empty to skip.")
@click.option("--edm-sampler", type=click.Choice(["heun", "bdia-edm", "ddim", "bdia", "edict"]), default="heun",
              show_default=True, help="Sampler and inversion of an EDM model (docs/methods.md#exact-inversion): "
              "Heun (ODE inversion), BDIA-EDM, BDIA-DDIM and EDICT (exact), DDIM (approximate).")
@click.option("--gamma", default="0.5", show_default=True, callback=_bdia_gamma,
              help="BDIA's gamma for --edm-sampler bdia-edm / bdia: a number in (0, 1], or obelm (O-BELM's "
              "per-step gamma, docs/methods.md#o-belm-gamma).")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True)
def generation(model: str, out: Path, data: str, reference_split: str, inversion_split: str, n: int,
               nfes: list[int], inversion_nfes: list[int], edm_sampler: str, gamma: float | str, seed: int,
               batch_size: int) -> None:
    """Generation and inversion quality of MODEL: FID/KID vs NFE, inversion MSE vs NFE, sample grids.

    Writes results.csv (long format), summary.md / summary.json and PNG grids to --out; prints the summary.
    A class-conditional MODEL samples uniform random classes seeded by --seed (written to class_labels.csv) and
    inverts the --data images under their own labels.

    \b
    Example:
      restore-bench generation runs/edm/ema.safetensors --out results/edm-gen --nfe 35 --inversion-nfe 20
    """
    import pandas as pd
    import torch

    from benchmarks.generation import evaluate_generation, evaluate_inversion, image_grid, sample_class_labels
    from operators.utils import from_uint8
    from restore.app.io import write_png
    from restore.datasets import build_dataset
    from restore.engine.checkpoints import load_model
    from restore.engine.wrappers import num_classes
    from restore.runtime.files import write_csv_atomic

    try:
        net = load_model(model)
        reference_set = build_dataset(data, reference_split)
        inverted_set = build_dataset(data, inversion_split)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    inverted = range(min(n, len(inverted_set)))
    try:  # a class-conditional model inverts each image under its own label
        inverted_labels = inverted_set.batch_labels(inverted) if inversion_nfes and num_classes(net) else None
    except ValueError as e:
        raise click.ClickException(f"{model} is class-conditional: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    reference = reference_set.get_batch(range(min(n, len(reference_set))))[1]
    sampler = {"edm_sampler": edm_sampler, "gamma": gamma}
    rows, samples = evaluate_generation(net, reference, nfes, n=n, seed=seed, batch_size=batch_size, **sampler)
    labels = sample_class_labels(net, n, seed)
    if labels is not None:  # the classes the samples were drawn for (the same for every NFE)
        write_csv_atomic(pd.DataFrame({"sample": range(n), "label": labels.tolist()}), out / "class_labels.csv")
    for nfe, x in samples.items():
        write_png(image_grid(from_uint8(x[:64]), 8)[None], out / f"samples_nfe{nfe}.png")
    if inversion_nfes:
        images = inverted_set.get_batch(inverted)[1]
        inv_rows, recs = evaluate_inversion(net, images, inversion_nfes, seed=seed, batch_size=batch_size, **sampler,
                                            class_labels=inverted_labels)
        rows += inv_rows
        strip = torch.cat([images[:16], *(recs[k][:16] for k in inversion_nfes)])  # rows: input, then per NFE
        write_png(image_grid(strip, 16)[None], out / "inversion.png")

    shown = gamma if isinstance(gamma, str) else f"{gamma:g}"
    label = f"{edm_sampler} gamma={shown}" if edm_sampler.startswith("bdia") else edm_sampler
    frame = pd.DataFrame(rows).assign(model=str(model), dataset=data, seed=seed, sampler=label)
    write_csv_atomic(frame, out / "results.csv")
    summary = (frame.groupby(["metric", "nfe"], as_index=False)["value"].mean()
               .pivot(index="nfe", columns="metric", values="value"))
    text = summary.to_markdown(floatfmt=".4g")
    (out / "summary.md").write_text(text + "\n")
    # {metric: {nfe: mean}} to 6 significant digits (inversion MSEs go far below 1e-6): the form model cards take
    # (`restore-train export --metrics`)
    means = {m: {f"{k:g}": float(f"{v:.6g}") for k, v in col.dropna().items()} for m, col in summary.items()}
    record = {"n": n, "data": data, "num_classes": num_classes(net), **means}
    if labels is not None:
        record["class_labels"] = "class_labels.csv"
    (out / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
    click.echo(text)
    click.echo(json.dumps({"out": str(out), "rows": len(frame)}), err=True)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="points.csv to write (kept and extended: scored snapshots are skipped).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Also draw the curves to this PNG.")
@click.option("--reference", default="cifar10:train", show_default=True,
              help="FID reference: NAME:SPLIT or a path (its first --n images).")
@click.option("--test", default="cifar10:test", show_default=True,
              help="Images to invert (BCM) and to restore (Palette, I2SB): NAME:SPLIT or a path (first --n).")
@click.option("--n", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Samples, reference and test images per snapshot.")
@click.option("--edm-nfe", type=click.IntRange(min=1), default=35, show_default=True, help="EDM Heun sampler NFE.")
@click.option("--bcm-nfe", "bcm_nfes", default="1,2", show_default=True, callback=_int_list,
              help="BCM / CM sampling NFE budgets.")
@click.option("--restore-nfe", type=click.IntRange(min=1), default=100, show_default=True,
              help="NFE of Palette / I2SB restorations.")
@click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, ...")
def curve(runs: tuple[Path, ...], out: Path, plot: Path | None, reference: str, test: str, n: int, edm_nfe: int,
          bcm_nfes: list[int], restore_nfe: int, batch_size: int, device: str) -> None:
    """Learning curves: score every EMA snapshot of each training run RUNS (restore-train --ckpt-every) and put it
    on the run's measured training compute (benchmarks.curves): FID/KID (EDM, BCM, CM samples; Palette / I2SB
    restorations), BCM inversion MSE, restoration PSNR.

    \b
    Example:
      restore-bench curve runs/edm runs/bcd --out docs/results/training/points.csv --plot curves.png
    """
    import torch

    from benchmarks.curves import CurveSettings, learning_curves, plot_curves

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = CurveSettings(reference=reference, test=test, n=n, edm_nfe=edm_nfe, bcm_nfe=bcm_nfes,
                             restore_nfe=restore_nfe, batch_size=batch_size, device=device)
    try:
        frame = learning_curves(runs, out, settings)
    except (ValueError, OSError) as e:
        raise _fail(e) from None
    if plot is not None:
        plot_curves(frame, plot)
    click.echo(json.dumps({"out": str(out), "rows": len(frame)}))


if __name__ == "__main__":
    main()
