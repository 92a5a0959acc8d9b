"""Learning curves: the quality of a training run's EMA snapshots against the compute spent to reach them.

Every ``restore-train`` run saves an EMA snapshot each ``--ckpt-every`` steps (``checkpoints/ema-<step>``). This
module scores each snapshot with the protocol of its family and puts it on the run's compute axis:

* EDM denoisers: FID/KID of ``n`` Heun samples at ``edm_nfe`` (`benchmarks.generation`);
* BCMs: FID/KID at each of ``bcm_nfe`` and the inversion MSE at 1 and 2 NFE (the BCM paper's protocol);
* consistency models: FID/KID at each of ``bcm_nfe`` (CM multistep sampling);
* Palette / I2SB: FID/KID and PSNR of their restorations of the first ``n`` test images under the operator they
  were trained for, at ``restore_nfe`` (measurement and restoration seeds: `restore.runtime.seeds`).

The compute of a snapshot is ``step x batch x gflop_per_image`` (the run's measured training compute, config.json)
plus ``prior_gflop``, the compute of what the run started from (a BCD teacher, a BCF / --init checkpoint), read
from that checkpoint's card or run folder (empty when unknown). The training time is the log's, up to the step.
Rows are appended to ``points.csv`` as each snapshot is done, so an interrupted evaluation continues where it
stopped; FID uses one fixed reference (the first ``n`` training images).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.fid import compute_fid_kid
from benchmarks.generation import evaluate_inversion, generate
from operators import build_operator
from restore.datasets import DATASETS, build_dataset
from restore.engine.checkpoints import load_model, read_metadata
from restore.engine.networks.unet import count_parameters
from restore.engine.wrappers import BCM, ConsistencyModel, EDMDenoiser
from restore.methods import get_method
from restore.quality import psnr
from restore.records.runs import CONFIG_JSON, STATE_JSON, log_seconds, run_compute, run_config
from restore.runtime.files import write_csv_atomic
from restore.runtime.seeds import measurement_generators, restoration_generators

__all__ = ["CurveSettings", "learning_curves", "run_points", "snapshots"]

KEY = ("run", "step", "metric", "nfe")  # one row per run, snapshot, metric and NFE


class CurveSettings:
    """What each snapshot is scored with."""

    def __init__(self, *, reference: str = "cifar10:train", test: str = "cifar10:test", n: int = 1000,
                 edm_nfe: int = 35, bcm_nfe=(1, 2), restore_nfe: int = 100, batch_size: int = 250,
                 device: str | torch.device = "cpu"):
        self.reference, self.test, self.n, self.edm_nfe, self.bcm_nfe = reference, test, n, edm_nfe, tuple(bcm_nfe)
        self.restore_nfe, self.batch_size, self.device = restore_nfe, batch_size, torch.device(device)


def snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of a run's EMA snapshots, by step."""
    found = [(int(p.stem.split("-")[1]), p) for p in (Path(run_dir) / "checkpoints").glob("ema-*.safetensors")]
    return sorted(found)


def _prior_gflop(spec: str | None) -> float | None:
    """Training compute behind a checkpoint a run started from: its card's, or its run folder's."""
    if not spec:
        return None
    run_dir = Path(spec).parent
    if (run_dir / CONFIG_JSON).is_file() and (run_dir / STATE_JSON).is_file():  # a run folder's EMA model
        own = run_compute(run_dir)
        before = _prior_gflop((run_config(run_dir).get("cli") or {}).get("options", {}).get("init"))
        return None if own is None else own + (before or 0.0)
    budget = (read_metadata(spec).get("card") or {}).get("budget") or {}
    return budget.get("train_gflop")


def run_info(run_dir: str | Path) -> dict:
    """The fields every row of a run carries: recipe, network, batch and compute per image."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    environment = config.get("environment") or {}
    cli = config.get("cli") or {}
    options = cli.get("options", {})
    recipe = cli.get("command", "?")
    if options.get("teacher"):
        recipe = "bcd"
    elif options.get("init"):
        recipe = {"bcm": "bcf"}.get(recipe, recipe + "-init")
    elif recipe == "bcm":
        recipe = "bct"
    if options.get("operator"):
        recipe += f" {options['operator']}"
    prior = _prior_gflop(options.get("teacher")) if options.get("teacher") else _prior_gflop(options.get("init"))
    return {"run": run_dir.name, "recipe": recipe, "preset": options.get("preset"), "batch": options.get("batch"),
            "gflop_per_image": (config.get("compute") or {}).get("gflop_per_image"), "prior_gflop": prior,
            "device": environment.get("device"), "host": environment.get("host")}


def _fid_rows(samples: torch.Tensor, reference: torch.Tensor, nfe: float, settings: CurveSettings) -> list[dict]:
    scores = compute_fid_kid(samples, reference, device=settings.device)
    return [{"metric": m, "nfe": nfe, "value": scores[m]} for m in ("fid", "kid")]


def _restoration_rows(model, clean: torch.Tensor, ids: list[str], reference, settings: CurveSettings) -> list[dict]:
    spec = model.wrapper_config()["operator"]
    op_family = build_operator(spec)
    method = get_method(model.kind)
    parts = []
    for lo in range(0, len(clean), settings.batch_size):
        x, batch_ids = clean[lo:lo + settings.batch_size].to(settings.device), ids[lo:lo + settings.batch_size]
        gens = measurement_generators(0, batch_ids, settings.device)
        op = op_family.draw(x.shape, gens, device=settings.device)
        with torch.no_grad():
            y = op.measure(x, gens)
            parts.append(method(model, y, op, nfe=settings.restore_nfe,
                                generator=restoration_generators(0, batch_ids, settings.device)).clamp(-1, 1).cpu())
    restored = torch.cat(parts)
    rows = [{"metric": "psnr", "nfe": settings.restore_nfe, "value": float(psnr(restored, clean).mean())}]
    return rows + _fid_rows(restored, reference, settings.restore_nfe, settings)


def score_snapshot(model, reference: torch.Tensor, test: tuple[list[str], torch.Tensor],
                   settings: CurveSettings) -> list[dict]:
    """The learning-curve rows of one model (see the module docstring)."""
    model = model.to(settings.device).eval()
    if type(model) is EDMDenoiser:  # not its subclasses (Palette / I2SB), which restore instead
        samples, nfe = generate(model, settings.n, settings.edm_nfe, batch_size=settings.batch_size,
                                device=settings.device)
        return _fid_rows(samples, reference, nfe, settings)
    if isinstance(model, BCM | ConsistencyModel):
        rows = []
        for k in settings.bcm_nfe:
            samples, nfe = generate(model, settings.n, k, batch_size=settings.batch_size, device=settings.device)
            rows += _fid_rows(samples, reference, nfe, settings)
        if isinstance(model, BCM):
            per_image, _ = evaluate_inversion(model, test[1].to(settings.device), (1, 2),
                                              batch_size=settings.batch_size)
            frame = pd.DataFrame(per_image)
            rows += [{"metric": "inversion_mse", "nfe": nfe, "value": v}
                     for nfe, v in frame.groupby("nfe")["value"].mean().items()]
        return rows
    if model.kind in ("palette", "i2sb"):
        return _restoration_rows(model, test[1], test[0], reference, settings)
    raise TypeError(f"no learning-curve protocol for a {type(model).__name__}")


def run_points(run_dir: str | Path, reference: torch.Tensor, test, settings: CurveSettings,
               done: set[tuple[str, int]] = frozenset(), on_rows=None) -> list[dict]:
    """Rows of every snapshot of ``run_dir`` not in ``done`` (``(run, step)`` pairs); ``on_rows(rows)`` after each."""
    run_dir = Path(run_dir)
    info = run_info(run_dir)
    seconds = [(r["step"], t) for r, t in log_seconds(run_dir)]
    out = []
    for step, path in snapshots(run_dir):
        if (info["run"], step) in done:
            continue
        started = time.perf_counter()
        model = load_model(path)
        rows = score_snapshot(model, reference, test, settings)
        images = step * info["batch"]
        train_gflop = None if info["gflop_per_image"] is None else images * info["gflop_per_image"]
        logged = [s for k, s in seconds if k <= step]
        fields = {**info, "step": step, "images": images, "train_gflop": train_gflop,
                  "total_gflop": None if train_gflop is None else train_gflop + (info["prior_gflop"] or 0.0),
                  "train_seconds": logged[-1] if logged else None, "parameters": count_parameters(model.net),
                  "n": settings.n, "eval_seconds": None}
        rows = [{**fields, **r} for r in rows]
        for r in rows:
            r["eval_seconds"] = round(time.perf_counter() - started, 1)
        out += rows
        if on_rows is not None:
            on_rows(rows)
    return out


def _dataset(spec: str):
    """``NAME:SPLIT`` of a named dataset, or a path."""
    name, _, split = spec.partition(":")
    return build_dataset(name, split or None) if name in DATASETS else build_dataset(spec)


def learning_curves(run_dirs, out_csv: str | Path, settings: CurveSettings) -> pd.DataFrame:
    """Score every snapshot of ``run_dirs`` into ``out_csv`` (kept and extended: finished snapshots are skipped)."""
    out_csv = Path(out_csv)
    frame = pd.read_csv(out_csv) if out_csv.is_file() else pd.DataFrame()
    done = set(zip(frame["run"], frame["step"])) if len(frame) else set()
    reference_set, test_set = _dataset(settings.reference), _dataset(settings.test)
    reference = reference_set.get_batch(range(min(settings.n, len(reference_set))))[1]
    test = test_set.get_batch(range(min(settings.n, len(test_set))))

    def append(rows: list[dict]) -> None:
        nonlocal frame
        frame = pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)
        write_csv_atomic(frame, out_csv)

    for run_dir in run_dirs:
        run_points(run_dir, reference, test, settings, done=done, on_rows=append)
    return frame


def plot_curves(frame: pd.DataFrame, dst: str | Path) -> Path:
    """FID (and BCM inversion MSE) against total training GFLOP, one line per run and NFE, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fid", "FID-1k"), ("inversion_mse", "BCM inversion MSE")]
    runs = sorted(frame["run"].unique())
    colours = {run: plt.get_cmap("tab20" if len(runs) > 10 else "tab10")(k) for k, run in enumerate(runs)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (metric, label) in zip(axes, panels):
        part = frame[frame["metric"] == metric]
        for (run, nfe), line in part.groupby(["run", "nfe"]):  # one colour per run, one line style per NFE
            line = line.sort_values("total_gflop")
            style = ("-", "--", ":", "-.")[sorted(part.loc[part["run"] == run, "nfe"].unique()).index(nfe) % 4]
            ax.plot(line["total_gflop"], line["value"], marker="o", ms=3, color=colours[run], linestyle=style,
                    label=f"{run} @ {nfe:g} NFE")
        ax.set(xscale="log", yscale="log", xlabel="training compute (GFLOP, teacher / init included)", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
        if len(part):
            ax.legend(fontsize=6)
    fig.tight_layout()
    dst = Path(dst)
    fig.savefig(dst, dpi=150)
    plt.close(fig)
    return dst
