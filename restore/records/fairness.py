"""Fair comparisons between trained models: what each checkpoint cost to train, and the rules a benchmark holds
its models to (README, "Fairness rules").

Rules, relative to a reference model (in a suite: its BCM):

1. the same backbone size, within ``TOLERANCE`` (5 %) of the reference's backbone parameters;
2. the same number of training images seen;
3. the same training data and split.

(The fourth rule, the same evaluation images and seeds for every method, holds by construction in the benchmark
runner.) *Backbone* parameters are all parameters except the BCM's second time embedding (``time_embed_end``,
``time_embed_align``): that branch is the BCM's extra input, and the BCM paper (Li & He 2024, §5 / Table 1)
compares against iCT on the same UNet without it, so it is reported but not counted against the baselines.

A model's record comes from its checkpoint alone: the architecture from the metadata, data / split / batch / preset
from the model card's ``recipe`` (the ``restore-train`` command that made it) and images seen and training time
from the card's ``budget``. ``restore-train --match MODEL`` trains under these rules; ``restore-bench models``
checks a suite.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from restore.engine.checkpoints import read_metadata
from restore.engine.networks.unet import UNet, UNetConfig

__all__ = ["TOLERANCE", "U_BRANCH", "backbone_parameters", "parameter_violation", "TrainingRecord", "training_record",
           "violations"]

TOLERANCE = 0.05
U_BRANCH = ("time_embed_end.", "time_embed_align.")


def backbone_parameters(net: torch.nn.Module) -> int:
    """Parameters of a UNet (or a wrapper holding one as ``.net``) without the BCM's u-embedding branch."""
    return sum(p.numel() for name, p in net.named_parameters()
               if not name.removeprefix("net.").startswith(U_BRANCH))


def recipe_options(recipe: str) -> dict[str, str | bool]:
    """``{"--flag": value}`` of a ``restore-train`` command line (flags without a value map to True)."""
    words = shlex.split(recipe)
    options: dict[str, str | bool] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else True
            options[word] = value
    return options


@dataclass(frozen=True)
class TrainingRecord:
    """What a checkpoint is and cost: architecture size, training data and budget (None where the card is silent)."""

    model: str
    wrapper: str
    parameters: int
    backbone_parameters: int
    data: str | None = None
    limit_images: int | None = None
    preset: str | None = None
    batch: int | None = None
    images: int | None = None
    train_seconds: float | None = None
    host: str | None = None

    @property
    def split(self) -> str | None:
        """The training images: ``cifar10`` (all) or ``cifar10[:N]`` (``--limit-images N``)."""
        if self.data is None:
            return None
        return self.data if self.limit_images is None else f"{self.data}[:{self.limit_images}]"

    def row(self) -> dict:
        return {"model": self.model, "wrapper": self.wrapper, "params": self.parameters,
                "backbone params": self.backbone_parameters, "data": self.split, "images seen": self.images,
                "train s": self.train_seconds, "host": self.host}


def training_record(name_or_path: str | Path) -> TrainingRecord:
    """The :class:`TrainingRecord` of a checkpoint (path or bundled name); reads metadata only, no weights."""
    meta = read_metadata(name_or_path)
    with torch.device("meta"):
        net = UNet(UNetConfig.from_dict(meta["unet"]))
    base = dict(model=str(name_or_path), wrapper=meta["wrapper"], parameters=sum(p.numel() for p in net.parameters()),
                backbone_parameters=backbone_parameters(net))
    card = meta["card"] or {}
    if "recipe" not in card:
        return TrainingRecord(**base)
    options = recipe_options(card["recipe"])
    budget = card.get("budget", {})

    def integer(flag: str) -> int | None:
        return int(options[flag]) if flag in options else None

    return TrainingRecord(**base, data=options.get("--data"), limit_images=integer("--limit-images"),
                          preset=options.get("--preset"), batch=integer("--batch"), images=budget.get("images"),
                          train_seconds=budget.get("train_seconds"), host=budget.get("host"))


def parameter_violation(backbone: int, reference: TrainingRecord, tolerance: float = TOLERANCE,
                        name: str = "the model") -> str | None:
    """Rule 1 for a network with ``backbone`` backbone parameters: None when within tolerance, else why not."""
    difference = backbone - reference.backbone_parameters
    if abs(difference) <= tolerance * reference.backbone_parameters:
        return None
    ratio = difference / reference.backbone_parameters
    return (f"{name}: {backbone:,} backbone parameters, {ratio:+.1%} from {reference.model}'s "
            f"{reference.backbone_parameters:,} (allowed ±{tolerance:.0%})")


def violations(record: TrainingRecord, reference: TrainingRecord, tolerance: float = TOLERANCE) -> list[str]:
    """The fairness rules ``record`` breaks relative to ``reference``, one sentence each (empty: fair)."""
    if record.images is None:
        return [f"{record.model}: no model card with a training recipe and budget, so its training is unknown"]
    if reference.images is None:
        return [f"{record.model}: cannot be compared with {reference.model}, whose training is unknown"]
    found = [parameter_violation(record.backbone_parameters, reference, tolerance, record.model)]
    if record.images != reference.images:
        found.append(f"{record.model}: saw {record.images:,} training images, {reference.model} saw "
                     f"{reference.images:,}")
    if record.split != reference.split:
        found.append(f"{record.model}: trained on {record.split}, {reference.model} on {reference.split}")
    return [v for v in found if v]
