"""`restore-train` command line: train BCMs (BCT, or BCD with ``--teacher``), consistency models (iCT), EDM diffusion
priors and the supervised conditional baselines (Palette, I2SB; one model per ``--operator``, pairs made on the fly).

Every subcommand is the shared option set (:func:`_common_options`) plus a ``build(opts, shape) -> (model,
loss)`` function; adding a model family is one such function and one decorated command.

Re-running a command with the same ``--out`` continues the run; options not given on the command line are
then taken from the run's stored options (so ``--out DIR --steps N`` extends a run), and ``--resume DIR`` is
the same with ``--out DIR``. Progress goes to stderr; a one-line JSON summary goes to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from baselines.i2sb import I2SB
from baselines.palette import Palette
from restore.datasets import DATASETS
from restore.engine.checkpoints import load_model, read_metadata, weights_sha256
from restore.engine.networks.unet import PRESETS, UNet, UNetConfig
from restore.engine.wrappers import BCM, ConsistencyModel, EDMDenoiser
from restore.records.fairness import (
    COMPUTE_TOLERANCE,
    backbone_parameters,
    compute_violation,
    format_gflop,
    parameter_violation,
    training_record,
)
from restore.records.runs import CONFIG_JSON
from restore.runtime import distributed
from restore.runtime.signals import interrupt_on_stop
from training.data import ImageData, training_images
from training.export import export_run
from training.finetune import bcm_from_cm, bcm_from_edm
from training.flops import MEASURE_BATCH, training_flops
from training.loop import TrainConfig, train
from training.losses import BCDLoss, BCTLoss, EDMLoss, ICTLoss
from training.paired import I2SBLoss, PaletteLoss

# Options describing where/how long/how to run, never stored as part of the run's identity.
_NOT_STORED = {"resume", "out", "chunk", "time_limit", "progress", "device"}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Train the models of the toolkit (BCM, consistency model, EDM prior) on an image set.

    \b
    Examples:
      restore-train bcm --data cifar10 --out runs/bcm --preset cifar-small --steps 20000 --batch 128 --bf16
      restore-train bcm --out runs/bcm --steps 40000          # continue / extend the same run
      restore-train bcm --teacher edm-cifar10 --data cifar10 --out runs/bcd --preset cifar-tiny --bf16   # distil
      restore-train palette --operator jpeg:quality=10 --data cifar10 --out runs/palette-jpeg10 --bf16
      torchrun --nproc_per_node 2 -m training edm --data cifar10 --out runs/edm --steps 1000
    """


def _common_options(*, lr: float, optimizer: str):
    """The options every subcommand shares; ``lr``/``optimizer`` are the family's defaults."""
    options = [
        click.option("--data", default="cifar10", show_default=True, metavar="NAME|NPZ",
                     help=f"Training images: a dataset name ({', '.join(DATASETS)}: its train split, looked up in "
                          "$BCM_RESTORE_DATA or ../shared/data) or a path restore.datasets reads "
                          "(.npz, image folder)."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                     help="Run directory (created; an existing run there is continued)."),
        click.option("--resume", type=click.Path(file_okay=False, exists=True, path_type=Path), metavar="DIR",
                     help="Continue the run in DIR with its stored options (same as --out DIR)."),
        click.option("--preset", default="cifar-small", show_default=True, metavar="NAME",
                     help="UNet preset (restore.engine.networks.unet.UNetConfig.preset); "
                          "resolution/channels follow the data."),
        click.option("--init", metavar="NAME|PATH",
                     help="Start from this checkpoint instead of a random network (bcm: also a CM checkpoint, "
                          "fine-tuned as in BCF with the identity u-path)."),
        click.option("--init-continues", is_flag=True,
                     help="--init is an earlier segment of this same training (an exported EMA in progress): its "
                          "card's budget counts toward --budget-gflop and is added to the exported card, which lists "
                          "each segment. Inexact: optimizer, EMA warm-up and data order start afresh."),
        click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), metavar="P",
                     help="Dropout everywhere (overrides the preset/checkpoint value)."),
        click.option("--steps", type=click.IntRange(min=1), default=20_000, show_default=True,
                     help="Total optimiser steps of the run."),
        click.option("--images", type=click.IntRange(min=1), metavar="N",
                     help="Total training images instead of --steps (steps = ceil(N / batch))."),
        click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Global batch size (split over torchrun processes)."),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=lr, show_default=True,
                     help="Learning rate."),
        click.option("--optimizer", type=click.Choice(["adam", "radam"]), default=optimizer, show_default=True,
                     help="Optimizer."),
        click.option("--lr-warmup", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Linear learning-rate warm-up in steps."),
        click.option("--grad-clip", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Clip the global gradient norm to this value (0 = off)."),
        click.option("--ema", "ema_rate", type=click.FloatRange(0, 1, max_open=True), default=0.9999,
                     show_default=True, help="Decay of the evaluation EMA (the saved model)."),
        click.option("--ema-warmup/--no-ema-warmup", default=True, show_default=True,
                     help="Use decay min(ema, (1+k)/(10+k)) at step k."),
        click.option("--xflip/--no-xflip", default=True, show_default=True, help="Random horizontal flips."),
        click.option("--bf16", is_flag=True, help="bf16 autocast for the network (the big CPU lever)."),
        click.option("--channels-last/--no-channels-last", default=True, show_default=True,
                     help="channels_last memory format for the network."),
        click.option("--compile", is_flag=True, help="torch.compile the network (GPU option; slower on CPU)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of initialisation, data order and noise."),
        click.option("--ckpt-every", type=click.IntRange(min=1), default=1000, show_default=True,
                     help="Save the state and an EMA snapshot every N steps."),
        click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True,
                     help="Write a log.jsonl line every N steps."),
        click.option("--limit-images", type=click.IntRange(min=1), metavar="N",
                     help="Train on the first N images only."),
        click.option("--match", metavar="MODEL",
                     help="Train under the fairness rules against MODEL (bundled name or checkpoint with a card): "
                          "its data and split, its number of training images, its batch and preset unless given, "
                          "and a backbone within ±5 % of its parameters (restore.records.fairness)."),
        click.option("--match-compute", is_flag=True,
                     help="With --match: match MODEL's training compute instead of its images: the number of steps "
                          "is MODEL's training GFLOP / (this run's measured GFLOP per image x batch), rounded, and "
                          "must land within ±10 % (MODEL's card must record its compute)."),
        click.option("--budget-gflop", type=click.FloatRange(0, min_open=True), metavar="GFLOP",
                     help="Training compute of the run instead of --steps / --images: the number of steps is GFLOP / "
                          "(this run's measured GFLOP per image x batch), rounded (restore-train campaign uses it)."),
        click.option("--chunk", type=click.IntRange(min=1), metavar="N",
                     help="Stop after N steps in this invocation (re-run to continue)."),
        click.option("--time-limit", type=click.FloatRange(0, min_open=True), metavar="MINUTES",
                     help="Stop (and save) after this many minutes; re-run to continue."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (cuda if available), cpu, cuda, cuda:1, …"),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _consistency_options(*, p_mean: float, p_std: float):
    options = [
        click.option("--s0", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Curriculum: initial number of discretisation intervals."),
        click.option("--s1", type=click.IntRange(min=1), default=1280, show_default=True,
                     help="Curriculum: final number of discretisation intervals."),
        click.option("--curriculum-steps", type=click.IntRange(min=1), metavar="K", show_default="--steps",
                     help="Curriculum length K (N doubles every K/(log2(s1/s0)+1) steps)."),
        click.option("--fixed-scales", type=click.IntRange(min=2), metavar="N",
                     show_default="320 with --init (BCF), else the curriculum",
                     help="Fixed number of intervals instead of the curriculum."),
        click.option("--huber-c", type=click.FloatRange(0, min_open=True), metavar="C",
                     show_default="0.00054*sqrt(C*H*W)", help="Pseudo-Huber constant."),
        click.option("--p-mean", type=float, default=p_mean, show_default=True,
                     help="Lognormal pair sampling: mean of ln t."),
        click.option("--p-std", type=click.FloatRange(0, min_open=True), default=p_std, show_default=True,
                     help="Lognormal pair sampling: std of ln t."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


# --------------------------------------------------------------------------------------------- model building

def _net_config(opts: dict, shape: tuple[int, int, int], bidirectional: bool) -> UNetConfig:
    c, h, w = shape
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    changes = dict(img_resolution=h, in_channels=c, out_channels=c, bidirectional=bidirectional)
    if opts["dropout"] is not None:
        changes.update(dropout=opts["dropout"], dropout_lowres=None)
    return dataclasses.replace(UNetConfig.preset(opts["preset"]), **changes)


def _new_net(config: UNetConfig, seed: int) -> UNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(config)


def _from_checkpoint(opts: dict, shape, wrapper_types: tuple[type, ...], option: str = "init"):
    """The checkpoint named by ``--init`` (or ``--teacher``, ``option="teacher"``), checked against the wrapper types
    and the data's image shape, with ``--dropout`` applied."""
    spec = opts[option]
    model = load_model(spec)
    flag = f"--{option} {spec}"
    if not isinstance(model, wrapper_types):
        names = " or ".join(t.__name__ for t in wrapper_types)
        raise ValueError(f"{flag}: a {type(model).__name__} checkpoint, this command needs {names}")
    cfg = model.net.config
    if (cfg.in_channels, cfg.img_resolution, cfg.img_resolution) != tuple(shape):
        raise ValueError(f"{flag}: network is for {cfg.in_channels}x{cfg.img_resolution}^2 images, "
                         f"data are {'x'.join(map(str, shape))}")
    if opts["dropout"] is not None:
        net = UNet(dataclasses.replace(cfg, dropout=opts["dropout"], dropout_lowres=None))
        net.load_state_dict(model.net.state_dict())
        model = type(model)(net, sigma_data=model.sigma_data, sigma_min=model.sigma_min, sigma_max=model.sigma_max,
                            **getattr(model, "wrapper_config", dict)())
    return model


def _consistency_loss(cls, opts: dict, **extra):
    return cls(total_steps=opts["curriculum_steps"], s0=opts["s0"], s1=opts["s1"], fixed_scales=opts["fixed_scales"],
               huber_c=opts["huber_c"], p_mean=opts["p_mean"], p_std=opts["p_std"], **extra)


def _build_bcm(opts: dict, shape):
    """BCT, or BCD with ``--teacher`` (docs/methods.md#bidirectional-consistency-distillation): the EDM teacher makes
    the adjacent pair, and the student starts from the teacher's weights with the identity u-path unless ``--init``."""
    teacher = _from_checkpoint(opts, shape, (EDMDenoiser,), option="teacher") if opts.get("teacher") else None
    if teacher is not None and type(teacher) is not EDMDenoiser:
        raise ValueError(f"--teacher {opts['teacher']}: a {teacher.kind} model; the teacher must be an EDM denoiser")
    if opts["init"]:
        model = _from_checkpoint(opts, shape, (BCM, ConsistencyModel))
        if isinstance(model, ConsistencyModel):
            model = bcm_from_cm(model)
    elif teacher is not None:
        model = bcm_from_edm(teacher)
    else:
        model = BCM(_new_net(_net_config(opts, shape, bidirectional=True), opts["seed"]))
    if teacher is None:
        return model, _consistency_loss(BCTLoss, opts)
    return model, _consistency_loss(BCDLoss, opts, teacher=teacher, teacher_name=str(opts["teacher"]),
                                    teacher_sha256=weights_sha256(opts["teacher"]))


def _build_ct(opts: dict, shape):
    if opts["init"]:
        model = _from_checkpoint(opts, shape, (ConsistencyModel,))
    else:
        model = ConsistencyModel(_new_net(_net_config(opts, shape, bidirectional=False), opts["seed"]))
    return model, _consistency_loss(ICTLoss, opts)


def _build_edm(opts: dict, shape):
    if opts["init"]:
        model = _from_checkpoint(opts, shape, (EDMDenoiser,))
    else:
        model = EDMDenoiser(_new_net(_net_config(opts, shape, bidirectional=False), opts["seed"]))
    return model, EDMLoss(p_mean=opts["p_mean"], p_std=opts["p_std"])


def _operator(opts: dict) -> str:
    if not opts["operator"]:
        raise ValueError("missing --operator SPEC: the degradation this model is trained to undo, e.g. jpeg:quality=10")
    return opts["operator"]


def _conditional(opts: dict, shape, cls, **settings):
    """A Palette / I2SB wrapper for ``settings`` (operator, ...): new, or ``--init`` from one trained for the same."""
    if opts["init"]:
        model = _from_checkpoint(opts, shape, (cls,))
        if model.wrapper_config() != settings:  # settings come canonical from the loss
            raise ValueError(f"--init {opts['init']}: trained with {model.wrapper_config()}, requested {settings}")
        return model
    config = dataclasses.replace(_net_config(opts, shape, bidirectional=False),
                                 cond_channels=shape[0] if cls is Palette else 0)
    return cls(_new_net(config, opts["seed"]), **settings)


def _build_palette(opts: dict, shape):
    loss = PaletteLoss(operator=_operator(opts), p_mean=opts["p_mean"], p_std=opts["p_std"])
    return _conditional(opts, shape, Palette, operator=loss.operator), loss


def _build_i2sb(opts: dict, shape):
    loss = I2SBLoss(operator=_operator(opts), beta_max=opts["beta_max"], interval=opts["interval"],
                    ot_ode=opts["ot_ode"])
    model = _conditional(opts, shape, I2SB, operator=loss.operator, beta_max=loss.beta_max, interval=loss.interval,
                         ot_ode=loss.ot_ode)
    return model, loss


# --------------------------------------------------------------------------------------------- running

def _resolve(ctx: click.Context, command: str, opts: dict) -> dict:
    """Merge with the stored options of an existing run and fill the derived defaults."""
    if opts["resume"] is not None:
        if opts["out"] is not None and Path(opts["out"]).resolve() != Path(opts["resume"]).resolve():
            raise click.UsageError("--out and --resume name different directories")
        opts["out"] = opts["resume"]
    if opts["out"] is None:
        raise click.UsageError("missing --out DIR (or --resume DIR)")
    stored_path = Path(opts["out"]) / CONFIG_JSON
    if stored_path.is_file():
        stored = json.loads(stored_path.read_text()).get("cli")
        if stored is not None:
            if stored["command"] != command:
                raise click.ClickException(f"{opts['out']} is a '{stored['command']}' run, not '{command}'")
            explicit = _explicit(ctx, opts)
            if "images" in explicit:
                explicit.add("steps")
            opts = {**opts, **{k: v for k, v in stored["options"].items() if k in opts and k not in explicit}}
    elif opts["resume"] is not None:
        raise click.ClickException(f"{opts['resume']} holds no run (no config.json)")
    if opts["init_continues"] and not opts["init"]:
        raise click.UsageError("--init-continues needs --init CHECKPOINT (the segment it continues)")
    if opts["init_continues"] and "curriculum_steps" in opts:
        raise click.UsageError("--init-continues: a consistency model's curriculum follows the step, so a restart "
                               "would repeat it; continue such a run from its run folder")
    if opts["match_compute"] and not opts["match"]:
        raise click.UsageError("--match-compute needs --match MODEL")
    if opts["budget_gflop"] and opts["match"]:
        raise click.UsageError("--budget-gflop and --match set the budget both; use --match MODEL --match-compute")
    if opts["match"]:
        opts = _match(ctx, opts)
    if opts.get("teacher") and not opts["init"]:
        opts["preset"] = _teacher_preset(opts["teacher"], opts["preset"] if "preset" in _explicit(ctx, opts) else None)
    if opts["images"] is not None:
        if ctx.get_parameter_source("steps") == ParameterSource.COMMANDLINE:
            raise click.UsageError("give --steps or --images, not both")
        opts["steps"] = math.ceil(opts["images"] / opts["batch"])
        opts["images"] = None
    if "curriculum_steps" in opts:
        opts["curriculum_steps"] = opts["curriculum_steps"] or opts["steps"]
        if opts["fixed_scales"] is None and opts["init"]:
            opts["fixed_scales"] = 320
    return opts


def _teacher_preset(teacher: str, requested: str | None) -> str | None:
    """The preset a student distilled from ``teacher`` has (it takes the teacher's network): ``requested`` if it is
    the teacher's architecture (error otherwise), else the first preset that is, else None (the recipe then has no
    --preset). Compared up to resolution, channels and dropout, which follow the data and --dropout."""
    try:
        cfg = UNetConfig.from_dict(read_metadata(teacher)["unet"])
    except ValueError as e:
        raise click.UsageError(f"--teacher: {e}") from None

    def matches(name: str) -> bool:
        try:
            preset = UNetConfig.preset(name, img_resolution=cfg.img_resolution, in_channels=cfg.in_channels,
                                       out_channels=cfg.out_channels, dropout=cfg.dropout,
                                       dropout_lowres=cfg.dropout_lowres, bidirectional=False)
        except ValueError:
            return False
        return preset == cfg

    if requested is not None:
        if not matches(requested):
            raise click.UsageError(f"--preset {requested} is not the network of --teacher {teacher}: a distilled "
                                   "student takes the teacher's network (omit --preset)")
        return requested
    return next((name for name in PRESETS if matches(name)), None)


def _explicit(ctx: click.Context, opts: dict) -> set[str]:
    return {k for k in opts if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE,
                                                               ParameterSource.ENVIRONMENT)}


def _match(ctx: click.Context, opts: dict) -> dict:
    """Options under the fairness rules against ``--match``: the reference's data, split and images seen
    (conflicting values are errors), its batch and preset unless given (the backbone is checked after building).
    With ``--match-compute`` the number of steps is left to :func:`_compute_budget`, which needs the built model."""
    name = opts["match"]
    try:
        ref = training_record(name)
    except ValueError as e:
        raise click.UsageError(f"--match: {e}") from None
    if ref.images is None or ref.batch is None:
        raise click.UsageError(f"--match {name}: the model has no card with a training recipe and budget")
    if opts["match_compute"] and ref.train_gflop is None:
        raise click.UsageError(f"--match {name} --match-compute: its card records no training compute (trained "
                               "before compute was measured); match its images with --match alone")
    explicit = _explicit(ctx, opts)
    opts = {**opts, **{k: v for k, v in (("batch", ref.batch), ("preset", ref.preset)) if k not in explicit}}
    for key, value in (("data", ref.data), ("limit_images", ref.limit_images)):
        if key in explicit and opts[key] != value:
            wanted = "all images" if value is None else value
            raise click.UsageError(f"--match {name} was trained with --{key.replace('_', '-')} {wanted}, "
                                   f"got {opts[key]}")
        opts[key] = value
    if opts["match_compute"]:
        return opts
    if ref.images % opts["batch"]:
        raise click.UsageError(f"--match {name}: --batch {opts['batch']} does not divide its {ref.images:,} "
                               "training images")
    steps = ref.images // opts["batch"]
    if "steps" in explicit and opts["steps"] != steps or "images" in explicit and opts["images"] != ref.images:
        raise click.UsageError(f"--match {name} sets the budget to its {ref.images:,} training images "
                               f"({steps} steps of {opts['batch']}); drop --steps / --images")
    opts["steps"], opts["images"] = steps, None
    return opts


def _compute_budget(ctx: click.Context, opts: dict, model, loss, data: ImageData) -> tuple[dict, dict]:
    """``--budget-gflop`` or ``--match-compute``: the number of steps whose training compute, measured for this model
    and loss with the run's settings exactly as the trainer will measure it (:func:`training.flops.training_flops`), is
    closest to the budget (``--match-compute``: the reference's, refused when whole batches cannot land within ±10 %).
    Refused when --steps / --images say otherwise. Returns the options and the measured compute record (the trainer
    keeps it instead of measuring again)."""
    batch = opts["batch"]
    ref = training_record(opts["match"]) if opts["match_compute"] else None
    if ref is not None:
        target, flag = ref.train_gflop, f"--match {opts['match']} --match-compute"
        what = f"its {format_gflop(target)} training GFLOP"
    else:
        target, flag = opts["budget_gflop"], f"--budget-gflop {opts['budget_gflop']:g}"
        what = f"{format_gflop(target)} training GFLOP"
    if opts["init_continues"]:  # the earlier segments spent part of the budget
        spent = _continued(opts)["budget"]["train_gflop"]
        if spent >= target:
            raise click.UsageError(f"{flag}: --init {opts['init']} has already spent {format_gflop(spent)} of "
                                   f"{what}")
        target, what = target - spent, f"the {format_gflop(target - spent)} GFLOP left of {what}"
    _, world, device = distributed.setup(None if opts["device"] == "auto" else opts["device"])
    compute = training_flops(model, loss, data, seed=opts["seed"], bf16=opts["bf16"],
                             channels_last=opts["channels_last"], device=device,
                             batch=min(MEASURE_BATCH, batch // world))
    per_image = compute["gflop_per_image"]
    steps = max(1, round(target / (per_image * batch)))
    total = steps * batch * per_image
    budget = (f"{steps} steps of {batch} ({format_gflop(total)} training GFLOP at {per_image:.4g} per image, "
              f"{total / target - 1:+.1%})")
    if ref is not None and compute_violation(total, ref):
        raise click.UsageError(f"{flag}: whole batches of {batch} cannot come within ±{COMPUTE_TOLERANCE:.0%} of "
                               f"{what}: {budget}; choose a smaller --batch")
    explicit = _explicit(ctx, opts)
    if ("steps" in explicit or "images" in explicit) and opts["steps"] != steps:
        raise click.UsageError(f"{flag} sets the budget to {what}: {budget}; drop --steps / --images")
    opts = {**opts, "steps": steps}
    if "curriculum_steps" in opts and "curriculum_steps" not in explicit:
        opts["curriculum_steps"] = steps  # the curriculum spans the run, as with a budget in steps
    return opts, compute


def _continued(opts: dict) -> dict:
    """What ``--init --init-continues`` continues: the checkpoint, its weights' sha256 and its card's budget (which
    must record the training compute and images). A started run keeps what it read when it started, so exporting it
    onto its own --init file (bundling progress) does not change the budget of its resume."""
    stored = Path(opts["out"]) / CONFIG_JSON
    if stored.is_file() and "continues" in (started := json.loads(stored.read_text())):
        return started["continues"]
    budget = (read_metadata(opts["init"]).get("card") or {}).get("budget") or {}
    if budget.get("train_gflop") is None or budget.get("images") is None:
        raise click.UsageError(f"--init-continues: the card of {opts['init']} records no training images and "
                               "compute to continue")
    return {"checkpoint": str(opts["init"]), "sha256": weights_sha256(opts["init"]), "budget": budget}


def _check_match(opts: dict, model) -> None:
    if opts["match"]:
        problem = parameter_violation(backbone_parameters(model.net), training_record(opts["match"]))
        if problem:
            raise ValueError(f"--match {opts['match']}: {problem}; choose another --preset")


def _run(ctx: click.Context, command: str, opts: dict, build) -> None:
    opts = _resolve(ctx, command, opts)
    try:
        images = training_images(opts["data"], opts["limit_images"])
        data = ImageData(images)
        model, loss = build(opts, data.shape)
        _check_match(opts, model)
        compute = None
        if opts["match_compute"] or opts["budget_gflop"]:
            opts, compute = _compute_budget(ctx, opts, model, loss, data)
            model, loss = build(opts, data.shape)  # again, for a loss whose curriculum follows the chosen steps
        config = TrainConfig(
            steps=opts["steps"], batch=opts["batch"], lr=opts["lr"], optimizer=opts["optimizer"],
            grad_clip=opts["grad_clip"], lr_warmup=opts["lr_warmup"], ema_rate=opts["ema_rate"],
            ema_warmup=opts["ema_warmup"], xflip=opts["xflip"], seed=opts["seed"], bf16=opts["bf16"],
            channels_last=opts["channels_last"], compile=opts["compile"], ckpt_every=opts["ckpt_every"],
            log_every=opts["log_every"])
        stored = {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items() if k not in _NOT_STORED}
        meta = {"cli": {"command": command, "options": stored}}
        if opts["init_continues"]:
            meta["continues"] = _continued(opts)
        with interrupt_on_stop():  # kill / a campaign's stop: save the state, then exit
            result = train(model, loss, data, config, opts["out"], meta=meta, max_steps=opts["chunk"],
                           time_limit=None if opts["time_limit"] is None else 60 * opts["time_limit"],
                           device=None if opts["device"] == "auto" else opts["device"], progress=opts["progress"],
                           compute=compute)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps({"run_dir": str(result.run_dir), "step": result.step, "images": result.images,
                           "train_gflop": result.train_gflop, "finished": result.finished,
                           "model": str(Path(result.run_dir) / "ema.safetensors")}))


@main.command()
@click.pass_context
@_common_options(lr=1e-4, optimizer="radam")
@_consistency_options(p_mean=-1.1, p_std=2.0)
@click.option("--teacher", metavar="NAME|PATH",
              help="Distil from this EDM denoiser (bundled name or checkpoint): BCD, the BCT loss with the adjacent "
                   "pair made by one Heun step of the teacher's PF ODE; the student starts from the teacher's "
                   "network (identity u-path) unless --init is given. Recorded in the run and its model card.")
def bcm(ctx, **opts):
    """Bidirectional consistency training (BCT, Li & He 2024) of a BCM.

    From scratch with the iCT curriculum, or fine-tuned from a consistency model with --init (BCF: u-path
    initialised to the identity, N fixed at 320 intervals). With --teacher: bidirectional consistency distillation
    (BCD): the same loss with the adjacent pair made by one Heun step of the EDM teacher, student initialised from
    the teacher's network (identity u-path) unless --init is given; 2 teacher forwards per training image.

    \b
    Examples:
      restore-train bcm --data cifar10 --out runs/bcm --preset cifar-small --steps 20000 --batch 128 --bf16
      restore-train bcm --data cifar10 --out runs/bcf --init runs/ct/ema.safetensors --steps 5000
      restore-train bcm --teacher edm-cifar10 --data cifar10 --out runs/bcd --preset cifar-tiny --batch 32 --bf16
    """
    _run(ctx, "bcm", opts, _build_bcm)


@main.command()
@click.pass_context
@_common_options(lr=1e-4, optimizer="radam")
@_consistency_options(p_mean=-1.1, p_std=2.0)
def ct(ctx, **opts):
    """Improved consistency training (iCT, Song & Dhariwal 2023) of a consistency model (the CM baseline).

    \b
    Example:
      restore-train ct --data cifar10 --out runs/ct --preset cifar-small --steps 20000 --batch 128 --bf16
    """
    _run(ctx, "ct", opts, _build_ct)


@main.command()
@click.pass_context
@_common_options(lr=2e-4, optimizer="adam")
@click.option("--p-mean", type=float, default=-1.2, show_default=True, help="Noise sampling: mean of ln sigma.")
@click.option("--p-std", type=click.FloatRange(0, min_open=True), default=1.2, show_default=True,
              help="Noise sampling: std of ln sigma.")
def edm(ctx, **opts):
    """EDM denoiser training (Karras et al. 2022): the diffusion prior for inversion and DPS-style methods.

    \b
    Example:
      restore-train edm --data cifar10 --out runs/edm --preset cifar-small --steps 20000 --batch 128 --bf16
    """
    _run(ctx, "edm", opts, _build_edm)


_OPERATOR_HELP = ("Degradation the model learns to undo (operators.build_operator spec, e.g. jpeg:quality=10, "
                  "box:size=16, down:factor=2,kernel=bicubic); stored with the checkpoint.")


@main.command()
@click.pass_context
@_common_options(lr=2e-4, optimizer="adam")
@click.option("--operator", metavar="SPEC", help=_OPERATOR_HELP + "  [required]")
@click.option("--p-mean", type=float, default=-1.2, show_default=True, help="Noise sampling: mean of ln sigma.")
@click.option("--p-std", type=click.FloatRange(0, min_open=True), default=1.2, show_default=True,
              help="Noise sampling: std of ln sigma.")
def palette(ctx, **opts):
    """Palette (Saharia et al. 2022): a denoiser conditioned on the degraded image, trained with the EDM loss on
    (clean, degraded) pairs made on the fly by --operator (baselines.palette).

    \b
    Example:
      restore-train palette --operator jpeg:quality=10 --data cifar10 --out runs/palette-jpeg10 --bf16
    """
    _run(ctx, "palette", opts, _build_palette)


@main.command()
@click.pass_context
@_common_options(lr=2e-4, optimizer="adam")
@click.option("--operator", metavar="SPEC", help=_OPERATOR_HELP + "  [required]")
@click.option("--beta-max", type=click.FloatRange(0, min_open=True), metavar="B",
              show_default="0.3 for jpeg/down, 1.0 for box/randbox", help="Bridge schedule: largest beta (times N).")
@click.option("--interval", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Number of discrete bridge steps N (even).")
@click.option("--ot-ode/--no-ot-ode", default=None, show_default="on for box/randbox",
              help="Noise-free bridge (OT-ODE) for training and sampling.")
def i2sb(ctx, **opts):
    """I2SB (Liu et al. 2023): Schrödinger bridge from the degraded to the clean image, eps-prediction on the bridge
    marginal, pairs made on the fly by --operator (baselines.i2sb).

    \b
    Example:
      restore-train i2sb --operator box:size=16 --data cifar10 --out runs/i2sb-box16 --preset cifar-small --bf16
    """
    _run(ctx, "i2sb", opts, _build_i2sb)


@main.command()
@click.option("--budget", "budget_gflop", type=click.FloatRange(0, min_open=True), required=True, metavar="GFLOP",
              help="Training compute of every model (measured GFLOP, the fairness rules' compute budget).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Campaign folder: one run folder per model, campaign.json, models/ (the exported checkpoints).")
@click.option("--data", default="cifar10", show_default=True, metavar="NAME|NPZ", help="Training images (as above).")
@click.option("--tag", metavar="NAME", show_default="the --data name",
              help="Suffix of the model names (edm-TAG, bcm-TAG, palette-TAG-jpeg10, ...).")
@click.option("--preset", default="cifar-tiny", show_default=True, help="UNet preset of every model.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Batch of every model.")
@click.option("--bf16/--no-bf16", default=None, show_default="on a GPU only",
              help="bf16 autocast. Off by default on CPU: on the 2-core AVX-512-BF16 machine of "
                   "docs/results/training, fp32 trained 1.6x faster.")
@click.option("--limit-images", type=click.IntRange(min=1), metavar="N", help="Train on the first N images only.")
@click.option("--ckpt-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="Steps between saved states and EMA snapshots (the points of a learning curve).")
@click.option("--only", metavar="NAME,...", help="Train only these members (default: the whole reference set).")
@click.option("--continue-from", type=click.Path(file_okay=False, exists=True, path_type=Path), metavar="DIR",
              help="Folder of exported members (<name>.safetensors, e.g. a campaign's bundled EMAs in progress): a "
                   "member with no run folder is taken from there when finished, else trained on from its EMA "
                   "(--init-continues, an inexact restart its card records).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Models trained at once (a GPU is under-used by one small model: try 8).")
@click.option("--time-limit", type=click.FloatRange(0, min_open=True), metavar="MINUTES",
              help="Stop every run (saving it) after this many minutes in all; re-run to continue.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, ...")
def campaign(budget_gflop: float, out: Path, data: str, tag: str | None, preset: str, batch: int, bf16: bool | None,
             limit_images: int | None, ckpt_every: int, only: str | None, continue_from: Path | None, jobs: int,
             time_limit: float | None, device: str) -> None:
    """Train the reference set at one training-compute budget: the EDM prior, the BCM (distilled from that prior),
    Palette and I2SB for JPEG q10, box 16 and SR x2 (training.campaign). Re-run the same command to continue after
    a stop; finished models are exported with their cards to OUT/models/. On another machine, continue from the
    exported models with --continue-from.

    \b
    Examples:
      restore-train campaign --budget 2e5 --out runs/campaign --time-limit 110          # CPU, in 2-hour chunks
      restore-train campaign --budget 2e6 --out runs/campaign-gpu --batch 128 --jobs 8  # one GPU
      restore-train campaign --budget 5e5 --out runs/campaign --continue-from docs/results/campaign
    """
    from training.campaign import reference_set, run_campaign

    members = reference_set(tag or (data if data in DATASETS else Path(data).stem))
    if only:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {m.name for m in members})
        if unknown:
            raise click.UsageError(f"--only: no member {', '.join(unknown)}; members: "
                                   f"{', '.join(m.name for m in members)}")
        members = tuple(m for m in members if m.name in wanted)
    if bf16 is None:
        bf16 = device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
    settings = dict(data=data, preset=preset, batch=batch, budget_gflop=budget_gflop, ckpt_every=ckpt_every,
                    bf16=bf16, limit_images=limit_images, device=device)

    def export(run_dir: Path, dst: Path) -> Path:
        return export_run(run_dir, dst, main.commands, notes=f"restore-train campaign --budget {budget_gflop:g}")

    try:
        status = run_campaign(out, members, settings, time_limit=None if time_limit is None else 60 * time_limit,
                              jobs=jobs, export=export, echo=lambda line: click.echo(line, err=True),
                              continue_from=continue_from)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(status))
    if any(s["rc"] for s in status.values()):
        raise click.ClickException("some runs failed (their stderr is in the campaign folder)")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--fp16/--fp32", default=True, show_default=True, help="Storage precision of the weights.")
@click.option("--metrics", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="JSON file of evaluation results to put in the model card.")
@click.option("--notes", help="Free text for the model card (limitations, intended use).")
def export(run_dir: Path, dst: Path, fp16: bool, metrics: Path | None, notes: str | None) -> None:
    """Write a run's EMA model as a checkpoint with a model card (recipe, budget, metrics).

    \b
    Example:
      restore-train export runs/bcm restore/weights/bcm-cifar10.safetensors --metrics results/bcm-gen/summary.json
    """
    try:
        out = export_run(run_dir, dst, main.commands, dtype=torch.float16 if fp16 else None,
                         metrics=json.loads(metrics.read_text()) if metrics else None, notes=notes)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    click.echo(str(out))


if __name__ == "__main__":
    main()
