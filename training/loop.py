"""The training loop shared by every model family (EDM denoisers, consistency models, BCMs).

``train(model, loss, data, config, run_dir)`` runs optimiser steps ``[resumed step, config.steps)`` and can be
called again on the same ``run_dir`` to continue — bit-for-bit identical to an uninterrupted run on CPU,
because every random draw of step k comes from a generator seeded by (seed, k, rank) and the batch order is a
function of (seed, k, rank) too (:func:`training.data.batch_indices`); the saved state only has to carry weights,
EMA, optimizer moments and the step.

Run directory:
  config.json       resolved config (train recipe, loss, model, data, versions; checked on resume) and
                    ``compute``: the training FLOPs per image of one step, measured when the run starts
                    (:func:`training.flops.training_flops`)
  log.jsonl         one JSON line every ``log_every`` steps (rank 0), with ``train_gflop`` = images x GFLOP/image
  state.json + state-<step>.safetensors   resumable state (:mod:`training.state`)
  ema.safetensors   latest evaluation-EMA model (``restore.engine.checkpoints.save_model``; load with
                    ``restore.load_model``)
  checkpoints/ema-<step>.safetensors      EMA snapshots every ``ckpt_every`` steps

Under ``torchrun`` (WORLD_SIZE > 1) the loss is wrapped in DistributedDataParallel (gloo on CPU, nccl on
CUDA); ``config.batch`` is the global batch, each rank takes its slice, rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from operators.utils import image_seed
from restore.engine.checkpoints import save_model
from restore.records.provenance import environment
from restore.records.runs import CONFIG_JSON, LOG_JSONL
from restore.runtime import distributed
from restore.runtime.files import write_text_atomic
from restore.runtime.progress import progress_bar
from training.data import ImageData, batch_indices
from training.flops import MEASURE_BATCH, training_flops
from training.state import has_state, load_state, save_state

__all__ = ["TrainConfig", "TrainResult", "train", "step_generator", "ema_beta", "RUNTIME_FIELDS"]

# Fields that may change between chunks of one run: run length, I/O cadence and execution details
# (precision/layout/compilation change rounding only, e.g. to continue a CPU run with bf16 on a GPU).
RUNTIME_FIELDS = frozenset({"steps", "ckpt_every", "log_every", "compile", "bf16", "channels_last"})


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe of a run (model- and loss-independent)."""

    steps: int = 20_000  # total optimiser steps of the run (a later call may raise it)
    batch: int = 128  # global batch size (all ranks together)
    lr: float = 1e-4  # learning rate (BCF/iCT: 1e-4)
    optimizer: str = "radam"  # "adam" | "radam" (BCF: RAdam, docs/methods.md#bct)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    lr_warmup: int = 0  # linear learning-rate warm-up, in steps
    ema_rate: float = 0.9999  # evaluation EMA decay per step
    ema_warmup: bool = True  # decay min(ema_rate, (1+k)/(10+k)) so short runs get a useful EMA
    xflip: bool = True  # random horizontal flips
    seed: int = 0
    bf16: bool = False  # bf16 autocast for the network (preconditioning, loss and optimizer stay fp32)
    channels_last: bool = False
    compile: bool = False  # torch.compile the network only
    ckpt_every: int = 1000  # steps between state saves and EMA snapshots
    log_every: int = 50  # steps between log lines

    def __post_init__(self):
        if self.optimizer not in ("adam", "radam"):
            raise ValueError(f"optimizer must be 'adam' or 'radam', got {self.optimizer!r}")
        for name in ("steps", "batch", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_rate < 1:
            raise ValueError(f"ema_rate must be in [0, 1), got {self.ema_rate}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        object.__setattr__(self, "betas", tuple(self.betas))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class TrainResult:
    step: int  # optimiser steps done so far in this run
    images: int  # training images seen so far (all ranks)
    finished: bool  # step == config.steps
    run_dir: Path
    train_gflop: float | None = None  # images x the measured GFLOP per image (rank 0; None elsewhere)


def step_generator(seed: int, step: int, rank: int = 0, device="cpu") -> torch.Generator:
    """The generator every random draw of optimiser ``step`` on ``rank`` comes from."""
    return torch.Generator(device).manual_seed(image_seed(seed, f"step{step}/rank{rank}"))


def ema_beta(step: int, rate: float, warmup: bool) -> float:
    """EMA decay after optimiser step ``step`` (0-based): ``rate``, or min(rate, (1+k)/(10+k)) with warm-up."""
    return min(rate, (1 + step) / (10 + step)) if warmup else rate


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    ema_p = [p for p in ema.parameters()]
    src = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, src, 1 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


class _Objective(nn.Module):
    """model + loss as one module, so DistributedDataParallel sees the whole multi-pass step as one forward."""

    def __init__(self, model: nn.Module, loss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, x: torch.Tensor, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.loss.terms(self.model, x, step=step, generator=generator)


def _describe(model: nn.Module, loss, data: ImageData, config: TrainConfig, meta: dict | None) -> dict:
    net_config = getattr(getattr(model, "net", None), "config", None)
    return {
        "train": config.to_dict(),
        "loss": {"name": type(loss).__name__, **loss.to_dict()},
        "model": {
            "wrapper": type(model).__name__,
            "net": net_config.to_dict() if net_config is not None else None,
            "sigma_min": model.sigma_min, "sigma_max": model.sigma_max, "sigma_data": model.sigma_data,
        },
        "data": {"num_images": len(data), "shape": list(data.shape)},
        **(meta or {}),
    }


def _check_resume(old: dict, new: dict, net_config=None) -> None:
    """Raise ValueError listing every recipe difference between the stored and the requested config.

    The network configs are compared as ``net_config``'s class reads them (`NetworkConfig.from_dict`), so a run
    saved before a config field existed resumes when the requested value is that field's default."""
    if net_config is not None and (old.get("model") or {}).get("net") is not None:
        old = {**old, "model": {**old["model"], "net": type(net_config).from_dict(old["model"]["net"]).to_dict()}}
    diffs = []
    for section in ("train", "loss", "model", "data"):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in RUNTIME_FIELDS:
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: run has {a.get(key)!r}, requested {b.get(key)!r}")
    if diffs:
        raise ValueError("cannot resume, the run directory was trained with a different recipe: " + "; ".join(diffs))


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[config.optimizer]
    return cls(model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
               weight_decay=config.weight_decay)


def train(model: nn.Module, loss, data, config: TrainConfig, run_dir: str | Path, *,
          meta: dict | None = None, max_steps: int | None = None, time_limit: float | None = None,
          device=None, progress: bool = True, compute: dict | None = None) -> TrainResult:
    """Train ``model`` (a restore.engine.wrappers wrapper, modified in place) with ``loss`` on ``data`` (an
    :class:`~training.data.ImageData` or anything it accepts: uint8 NHWC array, float NCHW tensor in [-1, 1]).

    Resumes from ``run_dir`` when it holds a state (the recipe must match, :data:`RUNTIME_FIELDS` may differ)
    and stops at ``config.steps``, after ``max_steps`` steps of this call, or once ``time_limit`` seconds have
    passed — saving the state in every case (and on Ctrl-C), so calling again continues exactly.
    ``meta``: extra JSON-able entries for config.json (e.g. the CLI's options). ``compute``: the run's
    :func:`training.flops.training_flops` record when the caller already measured it (else measured here).
    """
    data = data if isinstance(data, ImageData) else ImageData(data)
    rank, world, device = distributed.setup(device)
    if config.batch % world:
        raise ValueError(f"batch {config.batch} is not divisible by the number of processes {world}")
    run_dir = Path(run_dir)
    is_main = rank == 0
    if is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = _make_optimizer(model, config)

    described = _describe(model, loss, data, config, meta)
    config_path = run_dir / CONFIG_JSON
    step, images, stored = 0, 0, {}
    if has_state(run_dir):
        stored = json.loads(config_path.read_text())
        _check_resume(stored, described, getattr(getattr(model, "net", None), "config", None))
        compute = stored.get("compute") or compute  # measured when the run started (absent in older runs)
        state = load_state(run_dir, model=model, ema=ema, optimizer=optimizer)
        step, images = state["step"], state["images"]
    if world > 1:
        dist.barrier()  # every rank has read config.json before rank 0 rewrites it
    if is_main:
        if compute is None:  # on a deep copy, own generator, forked RNG: the run's stream and weights are untouched
            compute = training_flops(model, loss, data, step=step, seed=config.seed, bf16=config.bf16,
                                     channels_last=config.channels_last, device=device,
                                     batch=min(MEASURE_BATCH, config.batch // world))
        # re-running a finished run trains nothing: it keeps the environment (git, host) that trained it
        env = (stored["environment"] if step >= config.steps and "environment" in stored
               else {**environment(), "device": _device_name(device)})
        write_text_atomic(json.dumps({**described, "compute": compute, "environment": env}, indent=1),
                          config_path)
    gflop_per_image = compute["gflop_per_image"] if compute else None

    previous_autocast = model.autocast_dtype
    if config.bf16:
        model.autocast_dtype = torch.bfloat16
    if config.compile:
        model.net.compile()
    objective = _Objective(model, loss)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective,
                                                        device_ids=[device] if device.type == "cuda" else None)
    model.train()

    first_step = step
    end = config.steps if max_steps is None else min(config.steps, step + max_steps)
    local_batch = config.batch // world
    started = time.perf_counter()
    window = {"t": started, "steps": 0, "sums": {}}

    def checkpoint(snapshot: bool) -> None:
        if is_main:
            save_state(run_dir, step=step, images=images, model=model, ema=ema, optimizer=optimizer)
            save_model(ema, run_dir / "ema.safetensors")
            if snapshot:
                save_model(ema, run_dir / "checkpoints" / f"ema-{step:08d}.safetensors")
        if world > 1:
            dist.barrier()

    bar = progress_bar("train", enabled=progress and is_main, fields=("info",))
    task = bar.add_task("train", total=config.steps, completed=step, info="")
    mid_update = False  # between optimizer.step() and the step counter: no consistent state to save
    try:
        with bar, (open(run_dir / LOG_JSONL, "a") if is_main else contextlib.nullcontext()) as log_file:
            while step < end:
                gen = step_generator(config.seed, step, rank, device)
                idx = batch_indices(len(data), config.batch, step, config.seed, rank, world)
                x = data.batch(idx).to(device, non_blocking=True)
                if config.xflip:
                    flip = torch.rand(local_batch, generator=gen, device=gen.device).to(device) < 0.5
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                lr = config.lr * min(1.0, (step + 1) / config.lr_warmup) if config.lr_warmup else config.lr
                for group in optimizer.param_groups:
                    group["lr"] = lr

                terms = objective(x, step, gen)
                total = sum(terms.values()).mean()
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if config.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                mid_update = True
                optimizer.step()
                _ema_update(ema, model, ema_beta(step, config.ema_rate, config.ema_warmup))
                step += 1
                images += config.batch
                mid_update = False
                window["steps"] += 1
                for name, value in {"loss": total, **{k: v.mean() for k, v in terms.items()}}.items():
                    window["sums"][name] = window["sums"].get(name, 0.0) + value.detach()

                if step % config.log_every == 0 or step == end:
                    record = _log_record(window, step, images, lr, loss, config, world, device, gflop_per_image)
                    if not math.isfinite(record["loss"]):
                        raise FloatingPointError(f"non-finite loss {record['loss']} at step {step}")
                    if is_main:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    bar.update(task, completed=step,
                               info=f"{record['images_per_s']:.1f} img/s  loss {record['loss']:.4g}")
                    window = {"t": time.perf_counter(), "steps": 0, "sums": {}}
                else:
                    bar.update(task, completed=step)
                if step % config.ckpt_every == 0:
                    checkpoint(snapshot=True)
                if time_limit is not None and time.perf_counter() - started > time_limit:
                    break
    except KeyboardInterrupt:
        if step > 0 and not mid_update:
            checkpoint(snapshot=False)
        raise
    finally:
        model.autocast_dtype = previous_autocast
    if step > first_step and step % config.ckpt_every:  # otherwise the last step already saved (or nothing ran)
        checkpoint(snapshot=step == config.steps)
    return TrainResult(step=step, images=images, finished=step >= config.steps, run_dir=run_dir,
                       train_gflop=None if gflop_per_image is None else images * gflop_per_image)


def _log_record(window: dict, step: int, images: int, lr: float, loss, config: TrainConfig, world: int,
                device: torch.device, gflop_per_image: float | None = None) -> dict:
    names = sorted(window["sums"])
    means = torch.stack([torch.as_tensor(window["sums"][n], dtype=torch.float64, device=device) for n in names])
    means = means / max(1, window["steps"])
    if world > 1:  # average over ranks (nccl needs the tensor on the GPU)
        dist.all_reduce(means)
        means /= world
    seconds = time.perf_counter() - window["t"]
    record = {"step": step, "images": images, **dict(zip(names, means.tolist())), "lr": lr,
              "images_per_s": window["steps"] * config.batch / max(seconds, 1e-9), "time": time.time()}
    if gflop_per_image is not None:  # rank 0, which measured it (only rank 0 writes the log)
        record["train_gflop"] = images * gflop_per_image
    if hasattr(loss, "num_points"):
        record["num_points"] = loss.num_points(step - 1)
    return record


def _device_name(device: torch.device) -> str:
    """The training device as a reader wants it in a learning curve: the GPU's name, or the CPU and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
