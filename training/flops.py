"""Training compute: the FLOPs one optimiser step spends per training image, measured on the run's own loss.

One step of a loss costs very different amounts per image: EDM, Palette and I2SB run the network once and
back-propagate (about 3 forward passes' worth), iCT adds a stop-gradient target pass (about 4), BCT adds a
jump and a target pass whose input gradient is needed (about 9, i.e. three EDM steps). The fairness rules
(:mod:`restore.records.fairness`) can therefore compare training *compute*, not only images seen; this module
measures it.

:func:`training_flops` runs ``loss.terms`` forward and backward once on a small batch of the run's data, under
the run's settings (bf16 autocast, channels_last, device), inside :class:`torch.utils.flop_counter.FlopCounterMode`
and divides by the batch. The counter counts matrix products and convolutions (forward and backward,
attention's products included, whichever kernel runs them: :func:`restore.engine.flops.flop_counter` adds the
fused CPU attention kernel that torch's registry lacks) -- the work that scales with the network -- and not element-wise
operations, normalisations or the optimizer update (per step, not per image). Every pass the loss makes is
counted: teacher / target forwards, the BCT jump, input gradients through a stop-gradient network.

The measurement leaves the run untouched: it works on a deep copy of the model (weights, gradients, dropout
seeds and the train/eval flag of the original are never touched), draws its noise from its own generator and
runs under :func:`torch.random.fork_rng`, so the global RNG stream (and with it bit-exact resume) is unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from operators.utils import image_seed
from restore.engine.flops import flop_counter
from training.data import ImageData

__all__ = ["MEASURE_BATCH", "loss_flops", "training_flops"]

MEASURE_BATCH = 4  # images in the measured batch: every counted op is linear in the batch, so small is exact


def loss_flops(model: torch.nn.Module, loss, x: torch.Tensor, *, step: int = 0, seed: int = 0,
               bf16: bool = False, channels_last: bool = False) -> dict[str, float]:
    """FLOPs of one forward + backward of ``loss.terms(model, x, step=step)`` (summed terms, batch mean), as
    ``{aten op: FLOPs}`` for the whole batch ``x``; ``model`` is deep-copied, never modified."""
    probe = copy.deepcopy(model).to(x.device)
    if channels_last:
        probe.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    probe.train()
    if bf16:
        probe.autocast_dtype = torch.bfloat16
    devices = [x.device] if x.device.type == "cuda" else []
    generator = torch.Generator(x.device).manual_seed(image_seed(seed, f"flops/step{step}"))
    with torch.random.fork_rng(devices=devices), flop_counter() as counter:
        terms = loss.terms(probe, x, step=step, generator=generator)
        sum(terms.values()).mean().backward()
    return {str(op): float(n) for op, n in counter.get_flop_counts()["Global"].items()}


def training_flops(model: torch.nn.Module, loss, data: ImageData, *, step: int = 0, seed: int = 0,
                   bf16: bool = False, channels_last: bool = False, device: torch.device | str | None = None,
                   batch: int = MEASURE_BATCH) -> dict[str, Any]:
    """The training compute of one image in one optimiser step of ``loss`` on ``model`` (see the module docstring),
    measured on the first ``batch`` images of ``data`` at optimiser ``step`` with the run's settings.

    Returns the JSON-able record a run keeps in its config.json: ``{"gflop_per_image", "by_op" (GFLOP per image
    of each counted op), "batch", "step", "counter"}``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = max(1, min(batch, len(data)))
    x = data.batch(torch.arange(n)).to(device)
    by_op = loss_flops(model, loss, x, step=step, seed=seed, bf16=bf16, channels_last=channels_last)
    return {"gflop_per_image": sum(by_op.values()) / n / 1e9,
            "by_op": {op: flops / n / 1e9 for op, flops in sorted(by_op.items())},
            "batch": n, "step": step, "counter": "torch.utils.flop_counter.FlopCounterMode"}
