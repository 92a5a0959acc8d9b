"""Export a training run as a shippable checkpoint with a model card (`restore-train export`).

The card is derived from the run itself, so the training command stays the single source of truth:
``recipe`` is the ``restore-train`` command line that reproduces the run (rebuilt from the options stored
in its config.json), ``budget`` the steps, images seen and training time read from its log plus the training
compute (``gflop_per_image``, measured when the run started and stored in its config.json, and ``train_gflop``
= images x gflop_per_image; both absent for runs from before compute was measured), and ``metrics`` whatever
evaluation results are passed in (e.g. `restore-bench generation`'s summary).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import torch

from restore.engine.checkpoints import load_model, save_model
from restore.records.runs import log_seconds, run_config, run_progress


def recipe_command(command: click.Command, name: str, options: dict[str, Any], out: str = "RUN_DIR") -> str:
    """The ``restore-train`` command line that gives ``options`` (stored CLI options of a run)."""
    words = ["restore-train", name]
    for param in command.params:
        if not isinstance(param, click.Option) or param.name not in options:
            continue
        value = options[param.name]
        if value is None:
            continue
        if param.is_flag:
            if value:
                words.append(param.opts[0])
            elif param.secondary_opts:
                words.append(param.secondary_opts[0])
            continue
        words += [param.opts[0], str(value)]
    return shlex.join(words + ["--out", out])


def training_budget(run_dir: str | Path) -> dict[str, Any]:
    """Steps, images seen and training seconds (from the log's per-window throughput) of a run."""
    timeline = log_seconds(run_dir)
    if not timeline:
        raise ValueError(f"{run_dir} has an empty log: nothing was trained")
    last, seconds = timeline[-1]
    state = run_progress(run_dir)  # the saved step may follow the last log line
    return {"steps": state["step"], "images": state["images"], "train_seconds": round(seconds, 1),
            "images_per_s": round(last["images"] / seconds, 2), "final_loss": last["loss"]}


def chained_budget(continues: dict, segment: dict) -> dict[str, Any]:
    """The budget of a training run in segments (``--init-continues``): the earlier segments' and this one's
    ``segment`` summed (steps, images, seconds, GFLOP), the rest from the last segment, and every segment listed in
    ``segments`` (each restart with the checkpoint it started from)."""
    before = continues["budget"]
    segments = before.get("segments") or [before]
    restart = {"restart": f"--init {continues['checkpoint']} --init-continues (weights sha256 "
                          f"{continues['sha256'][:12]}): EMA weights only; optimizer, EMA warm-up and data order "
                          "started afresh"}
    segments = [*segments, {**segment, **restart}]
    total = {key: sum(s[key] for s in segments) for key in ("steps", "images", "train_seconds")}
    total["train_seconds"] = round(total["train_seconds"], 1)
    if all(s.get("train_gflop") is not None for s in segments):
        total["train_gflop"] = float(f"{sum(s['train_gflop'] for s in segments):.6g}")
    return {**segment, **total, "segments": segments}


def export_run(run_dir: str | Path, dst: str | Path, commands: Mapping[str, click.Command], *,
               dtype: torch.dtype | None = torch.float16, metrics: dict | None = None,
               notes: str | None = None) -> Path:
    """Write the run's EMA model to ``dst`` (safetensors, ``dtype`` storage) with a model card; ``commands``:
    the ``restore-train`` subcommands by name, whose options turn the run's stored options into its recipe."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    stored = config.get("cli")
    if stored is None:
        raise ValueError(f"{run_dir} was not trained with restore-train: no stored command to put in the card")
    environment = config.get("environment", {})
    budget = training_budget(run_dir)
    gflop_per_image = (config.get("compute") or {}).get("gflop_per_image")
    if gflop_per_image is not None:  # runs from before compute was measured have none: the card says nothing
        budget.update(gflop_per_image=float(f"{gflop_per_image:.6g}"),
                      train_gflop=float(f"{budget['images'] * gflop_per_image:.6g}"))
    recipe = recipe_command(commands[stored["command"]], stored["command"], stored["options"])
    budget["finished"] = budget["steps"] >= stored["options"]["steps"]
    if not budget["finished"]:  # stopped early (time limit): same curriculum, fewer steps
        recipe = recipe.replace(" --out ", f" --chunk {budget['steps']} --out ")
    budget.update(host=environment.get("host"), torch=environment.get("versions", {}).get("torch"),
                  git=environment.get("git", {}).get("commit"))
    if config.get("continues"):
        budget = chained_budget(config["continues"], budget)
    card = {
        "recipe": recipe,
        "data": stored["options"].get("data"),
        "budget": budget,
        "metrics": metrics or {},
        "notes": notes or "",
    }
    return save_model(load_model(run_dir / "ema.safetensors"), dst, dtype=dtype, card=card)
