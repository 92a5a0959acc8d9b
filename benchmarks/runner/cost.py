"""Cost before compute: what a suite will spend, estimated without running it (`restore-bench run --dry-run`).

Input: a :class:`~benchmarks.runner.plan.Plan`, the device and the run's
:class:`~restore.engine.acceleration.Acceleration`. Output: :class:`Cost`, one row per cell and the totals.
Nothing is written and no method runs on the suite's images.

Per cell (operator x method entry x NFE budget x seed):

* ``nfe``, ``nfe_backward``: the network forward and backward passes per image that the runner's counter will
  report (`restore.engine.nfe`). No formula predicts them for every method (BCM rounds, Heun steps, DPS's forward +
  backward per step, I2SB's bridge steps), so they are counted: the cell's method runs once on ONE image of the
  suite with the model's network swapped for a stand-in (:class:`_StandIn`) that returns zeros of the network's
  output shape. The wrapper counts the stand-in's calls exactly as it counts the network's, and how many calls a
  method makes depends on its budget and hyper-parameters, never on the network's values, so the count is the
  run's; the probe costs only the method's own work on one image. Seeds share it.
* ``gflop_forward``: one network forward per image, measured with torch's FLOP counter
  (`restore.engine.flops.flop_counter`: convolutions and matrix products) on the first input the method gives the
  network in the probe, i.e. at the suite's image size with the model's conditioning and u branch.
* ``gflop_per_image`` = ``gflop_forward`` x (``nfe`` + :data:`BACKWARD_COST` x ``nfe_backward``): a backward pass
  through the network is counted as two forwards (input and weight gradients, the usual rule; the gradient methods
  need only the input gradient, so for them this is an upper bound). ``gflop_total`` = images x ``gflop_per_image``.
* ``est_seconds``: ``gflop_total`` / the model's measured throughput: one forward of a batch of
  :data:`THROUGHPUT_BATCH` images (the probe's first network input repeated) on the device with the run's bf16 /
  channels_last, the fastest of :data:`TIMED_CALLS` after one warm-up call. It counts network work only (not the
  JPEG codec, projections, metrics, FID's Inception passes or file I/O), and a small batch under-uses a GPU, so it
  is a rough guide. ``--compile`` is not applied here (compiling would take longer than the estimate and changes no
  FLOP count).

Given what an existing output folder holds (:class:`~benchmarks.runner.journal.Finished`), each row also says how
many of the cell's images the method has ``restored`` and whether the cell is ``complete`` (image and set metrics
done), and ``est_seconds_left`` counts only the images still to restore; the totals add what is left. A run spanning
sessions reads there what its next session will spend.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from torch import nn

from benchmarks.runner.execute import batch_generators, load_model
from benchmarks.runner.journal import Finished
from benchmarks.runner.plan import Cell, Plan
from benchmarks.suites import config_hash
from operators import build_operator
from restore.engine.acceleration import OFF, Acceleration
from restore.engine.flops import flop_counter

BACKWARD_COST = 2.0  # a backward pass through the network, in forward passes
THROUGHPUT_BATCH = 4  # images in the timed forward batch
TIMED_CALLS = 3  # the fastest counts: the one least disturbed by other work on the machine

COST_COLUMNS = ["operator", "method", "nfe_budget", "seed", "model", "images", "nfe", "nfe_backward", "gflop_forward",
                "gflop_per_image", "gflop_total", "est_seconds", "restored", "complete", "est_seconds_left"]


@dataclass(frozen=True)
class Network:
    """What one model's network costs: GFLOP of a forward per image and measured GFLOP per second."""

    gflop_forward: float
    gflop_per_second: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_of(value, n: int):
    """A one-image network argument repeated to ``n`` images (other arguments as they are)."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == 1:
        return value.expand(n, *value.shape[1:]).contiguous()
    return value


def measure_network(net: nn.Module, *args, **kwargs) -> tuple[Network, torch.Tensor]:
    """FLOPs per image of ``net(*args, **kwargs)`` (one-image arguments) and its throughput on a batch of
    :data:`THROUGHPUT_BATCH`; returns the measurement and the one-image output."""
    with torch.no_grad():
        with flop_counter() as counter:
            out = net(*args, **kwargs)
        flops = counter.get_total_flops() / out.shape[0]
        batch = [_batch_of(a, THROUGHPUT_BATCH) for a in args]
        named = {k: _batch_of(v, THROUGHPUT_BATCH) for k, v in kwargs.items()}
        net(*batch, **named)  # warm-up: kernel selection, caches
        seconds = []
        for _ in range(TIMED_CALLS):
            _sync(out.device)
            start = time.perf_counter()
            net(*batch, **named)
            _sync(out.device)
            seconds.append(time.perf_counter() - start)
    return Network(flops / 1e9, flops * THROUGHPUT_BATCH / 1e9 / max(min(seconds), 1e-9)), out


class _StandIn(nn.Module):
    """Takes a wrapper's network's place during the probes of one model. Its first call runs the real network, to
    measure it (:func:`measure_network`); every call returns zeros of the network's output shape, tied to the input's
    autograd graph so that backward passes through it are counted as through the real one."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.real = net  # a submodule, so the wrapper still sees the network's dtype
        self.config = getattr(net, "config", None)  # what the methods read (e.g. num_classes)
        self.network: Network | None = None
        self._channels = 0

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.network is None:
            self.network, out = measure_network(self.real, x[:1], *(_first(a) for a in args),
                                                **{k: _first(v) for k, v in kwargs.items()})
            self._channels = out.shape[1]
        return x.new_zeros((x.shape[0], self._channels, *x.shape[2:])) + 0 * x.sum()


def _first(value):
    return value[:1] if isinstance(value, torch.Tensor) and value.ndim else value


def _probe(cell: Cell, model: nn.Module, stand_in: _StandIn, x: torch.Tensor, image_id: str,
           device: torch.device) -> tuple[int, int]:
    """Counted (forward, backward) NFE per image of ``cell``'s method on the one image ``x``, with ``stand_in`` in
    the place of the model's network (see the module docstring)."""
    from restore.methods import get_method

    method = get_method(cell.method)
    gens = batch_generators(cell.seed, [image_id], device)
    op = build_operator(cell.operator).draw(x.shape, gens.measure, device=device)
    with torch.no_grad():
        y = op.measure(x, gens.measure)
    real, model.net = model.net, stand_in
    try:
        grad = torch.enable_grad() if method.needs_grad else torch.inference_mode()
        with grad, model.counter.counting() as tally:
            labels = torch.zeros(1, dtype=torch.long, device=device) if cell.class_labels else None
            method(model, y, op, nfe=cell.nfe, generator=gens.method, class_labels=labels, **cell.hparams)
    finally:
        model.net = real
    return tally.forward, tally.backward


@dataclass(frozen=True)
class Cost:
    """The estimate of a run: one row per cell (:data:`COST_COLUMNS`), the device and the measured networks;
    ``resumed``: whether the rows count what an existing output folder has finished."""

    rows: pd.DataFrame
    device: str
    networks: dict[str, Network]
    resumed: bool = False

    @property
    def total(self) -> dict[str, float]:
        rows = self.rows
        share_left = (rows.images - rows.restored) / rows.images  # as est_seconds_left
        return {"cells": len(rows), "gflop": float(rows.gflop_total.sum()), "seconds": float(rows.est_seconds.sum()),
                "cells_left": int((~rows.complete).sum()), "gflop_left": float((rows.gflop_total * share_left).sum()),
                "seconds_left": float(rows.est_seconds_left.sum())}

    def to_json(self) -> dict:
        return {"device": self.device, "cells": self.rows.to_dict(orient="records"), "total": self.total,
                "networks": {m: asdict(n) for m, n in self.networks.items()}, "backward_cost": BACKWARD_COST,
                "throughput_batch": THROUGHPUT_BATCH, "resumed": self.resumed}

    def render(self) -> str:
        total = self.total
        lines = [self.rows.to_string(index=False, float_format=lambda v: f"{v:.4g}"), ""]
        lines += [f"{m}: {n.gflop_forward:.4g} GFLOP per forward per image, {n.gflop_per_second:.4g} GFLOP/s on "
                  f"{self.device} (batch {THROUGHPUT_BATCH})" for m, n in self.networks.items()]
        lines.append(f"total: {total['cells']} cells, {total['gflop']:.4g} GFLOP, about {total['seconds']:.3g} s of "
                     f"network time on {self.device} (backward = {BACKWARD_COST:g} forwards; network work only)")
        if self.resumed:
            lines.append(f"left: {total['cells_left']} cells, {total['gflop_left']:.4g} GFLOP, about "
                         f"{total['seconds_left']:.3g} s of network time (the images not restored yet)")
        return "\n".join(lines)


def estimate_cost(plan: Plan, device: torch.device, acceleration: Acceleration = OFF,
                  finished: Finished | None = None) -> Cost:
    """The cost of running ``plan`` on ``device``, less what ``finished`` (an output folder's journals) holds (see
    the module docstring); runs no method on the suite."""
    ids, x = plan.dataset.get_batch([plan.indices[0]])
    x = x.to(device)
    speed = Acceleration(acceleration.bf16, acceleration.channels_last)  # compiling would outlast the probe
    models: dict[str, tuple[nn.Module, _StandIn]] = {}
    counts: dict[str, tuple[int, int]] = {}
    rows = []
    for cell in plan.cells:
        if cell.model is not None and cell.model not in models:
            model = load_model(cell.model, device, speed)[0]
            models[cell.model] = model, _StandIn(model.net)
        key = config_hash({**cell.config, "seed": None})  # seeds share the count
        if cell.model is None:  # network-free methods cost nothing here: not run
            counts[key] = (0, 0)
        if key not in counts:
            try:
                counts[key] = _probe(cell, *models[cell.model], x, ids[0], device)
            except Exception as e:  # the run would fail this cell: say which, before anything is spent
                raise ValueError(f"{cell.describe()}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                 ) from e
        forward, backward = counts[key]
        network = models[cell.model][1].network if cell.model is not None else None
        gflop = network.gflop_forward if network else 0.0
        per_image = gflop * (forward + BACKWARD_COST * backward)
        images = len(plan.ids)
        total = per_image * images
        seconds = total / network.gflop_per_second if network else 0.0
        restored, complete = finished.progress(plan, cell) if finished else (0, False)
        rows.append({"operator": cell.operator, "method": cell.label, "nfe_budget": cell.nfe, "seed": cell.seed,
                     "model": cell.model or "", "images": images, "nfe": forward, "nfe_backward": backward,
                     "gflop_forward": gflop, "gflop_per_image": per_image, "gflop_total": total,
                     "est_seconds": seconds, "restored": restored, "complete": complete,
                     "est_seconds_left": seconds * (images - restored) / images})
    networks = {ref: stand_in.network for ref, (_, stand_in) in models.items() if stand_in.network is not None}
    return Cost(pd.DataFrame(rows, columns=COST_COLUMNS), str(device), networks, finished is not None)
