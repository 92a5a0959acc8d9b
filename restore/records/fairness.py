"""Fair comparisons between trained models: what each checkpoint cost to train, and the rules a benchmark holds
its models to (README, "Fairness rules").

Rules, relative to a reference model (in a suite: its BCM):

1. the same backbone size, within ``TOLERANCE`` (5 %) of the reference's backbone parameters;
2. the same training budget: the same number of training images seen, **or** training compute within
   ``COMPUTE_TOLERANCE`` (±10 %) of the reference's (GFLOP measured by ``training.flops`` when the run started,
   times images seen). Either form satisfies the rule; the compute form is only checked when both models have a
   recorded compute -- cards written before compute was measured have none, which is reported as "not recorded"
   (the compute form not checked), never as a violation by itself;
3. the same training data and split.

(The fourth rule, the same evaluation images and seeds for every method, holds by construction in the benchmark
runner.) *Backbone* parameters are all parameters except the BCM's second time embedding (``time_embed_end``,
``time_embed_align``): that branch is the BCM's extra input, and the BCM paper (Li & He 2024, §5 / Table 1)
compares against iCT on the same UNet without it, so it is reported but not counted against the baselines.

Why two forms of rule 2: one BCT step costs about three EDM steps per image (two student passes with their
backward, a target pass back-propagated to its input), so equal images give the BCM three times the compute of an
EDM prior, and equal compute gives the EDM prior three times the images. Both are fair in their own sense; the
report says which one each model keeps.

A model's record comes from its checkpoint alone: the architecture from the metadata, data / split / batch / preset
from the model card's ``recipe`` (the ``restore-train`` command that made it) and images seen, training time and
training compute from the card's ``budget``. ``restore-train --match MODEL [--match-compute]`` trains under these
rules; ``restore-bench models`` checks a suite.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from restore.engine.checkpoints import read_metadata
from restore.engine.networks import build_network

__all__ = ["TOLERANCE", "COMPUTE_TOLERANCE", "U_BRANCH", "backbone_parameters", "parameter_violation",
           "compute_violation", "budget_matches", "format_gflop", "TrainingRecord", "training_record", "violations"]

TOLERANCE = 0.05
COMPUTE_TOLERANCE = 0.10
U_BRANCH = ("time_embed_end.", "time_embed_align.")


def format_gflop(gflop: float) -> str:
    """``96,621`` for large amounts, three significant digits for small ones (``19.7``, ``0.537``)."""
    return f"{gflop:,.0f}" if abs(gflop) >= 100 else f"{gflop:.3g}"


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
    gflop_per_image: float | None = None  # training compute of one image in one step (None: not recorded)
    train_gflop: float | None = None  # images x gflop_per_image

    @property
    def split(self) -> str | None:
        """The training images: ``cifar10`` (all) or ``cifar10[:N]`` (``--limit-images N``)."""
        if self.data is None:
            return None
        return self.data if self.limit_images is None else f"{self.data}[:{self.limit_images}]"

    def row(self) -> dict:
        return {"model": self.model, "wrapper": self.wrapper, "params": self.parameters,
                "backbone params": self.backbone_parameters, "data": self.split, "images seen": self.images,
                "GFLOP/image": self.gflop_per_image, "train GFLOP": self.train_gflop, "train s": self.train_seconds,
                "host": self.host}


def training_record(name_or_path: str | Path) -> TrainingRecord:
    """The :class:`TrainingRecord` of a checkpoint (path or bundled name); reads metadata only, no weights."""
    meta = read_metadata(name_or_path)
    with torch.device("meta"):
        net = build_network(meta["network"], meta["unet"])
    base = dict(model=str(name_or_path), wrapper=meta["wrapper"], parameters=sum(p.numel() for p in net.parameters()),
                backbone_parameters=backbone_parameters(net))
    card = meta["card"] or {}
    if "recipe" not in card:
        return TrainingRecord(**base)
    options = recipe_options(card["recipe"])
    budget = card.get("budget", {})

    def integer(flag: str) -> int | None:
        return int(options[flag]) if flag in options else None

    images, per_image = budget.get("images"), budget.get("gflop_per_image")
    total = budget.get("train_gflop")
    if total is None and per_image is not None and images is not None:
        total = images * per_image
    return TrainingRecord(**base, data=options.get("--data"), limit_images=integer("--limit-images"),
                          preset=options.get("--preset"), batch=integer("--batch"), images=images,
                          train_seconds=budget.get("train_seconds"), host=budget.get("host"),
                          gflop_per_image=per_image, train_gflop=total)


def parameter_violation(backbone: int, reference: TrainingRecord, tolerance: float = TOLERANCE,
                        name: str = "the model") -> str | None:
    """Rule 1 for a network with ``backbone`` backbone parameters: None when within tolerance, else why not."""
    difference = backbone - reference.backbone_parameters
    if abs(difference) <= tolerance * reference.backbone_parameters:
        return None
    ratio = difference / reference.backbone_parameters
    return (f"{name}: {backbone:,} backbone parameters, {ratio:+.1%} from {reference.model}'s "
            f"{reference.backbone_parameters:,} (allowed ±{tolerance:.0%})")


def compute_violation(train_gflop: float, reference: TrainingRecord, tolerance: float = COMPUTE_TOLERANCE,
                      name: str = "the model") -> str | None:
    """The compute form of rule 2 for ``train_gflop`` GFLOP of training: None when within ±``tolerance`` of the
    reference's (inclusive), else why not. The reference must have a recorded compute."""
    if reference.train_gflop is None:
        raise ValueError(f"{reference.model} has no recorded training compute")
    difference = train_gflop - reference.train_gflop
    if abs(difference) <= tolerance * reference.train_gflop * (1 + 1e-12):  # the edge itself is within
        return None
    return f"{name}: {_compute_difference(train_gflop, reference, tolerance)}"


def _compute_difference(train_gflop: float, reference: TrainingRecord, tolerance: float) -> str:
    ratio = (train_gflop - reference.train_gflop) / reference.train_gflop
    return (f"{format_gflop(train_gflop)} training GFLOP, {ratio:+.1%} from {reference.model}'s "
            f"{format_gflop(reference.train_gflop)} (allowed ±{tolerance:.0%})")


def budget_matches(record: TrainingRecord, reference: TrainingRecord,
                   compute_tolerance: float = COMPUTE_TOLERANCE) -> list[str]:
    """The forms of rule 2 that ``record`` keeps: ``"images"`` (the same images seen) and / or ``"compute"``
    (training compute within tolerance; only when both computes are recorded)."""
    found = []
    if record.images is not None and record.images == reference.images:
        found.append("images")
    if (record.train_gflop is not None and reference.train_gflop is not None
            and compute_violation(record.train_gflop, reference, compute_tolerance) is None):
        found.append("compute")
    return found


def violations(record: TrainingRecord, reference: TrainingRecord, tolerance: float = TOLERANCE,
               compute_tolerance: float = COMPUTE_TOLERANCE) -> list[str]:
    """The fairness rules ``record`` breaks relative to ``reference``, one sentence each (empty: fair)."""
    if record.images is None:
        return [f"{record.model}: no model card with a training recipe and budget, so its training is unknown"]
    if reference.images is None:
        return [f"{record.model}: cannot be compared with {reference.model}, whose training is unknown"]
    found = [parameter_violation(record.backbone_parameters, reference, tolerance, record.model)]
    if not budget_matches(record, reference, compute_tolerance):
        images = (f"{record.model}: saw {record.images:,} training images, {reference.model} saw "
                  f"{reference.images:,}")
        unrecorded = [r.model for r in (record, reference) if r.train_gflop is None]
        if unrecorded:
            found.append(f"{images}, and the training compute of {' and '.join(unrecorded)} is not recorded, so it "
                         "cannot be matched by compute either")
        else:
            found.append(f"{images}, and it is not compute-matched either: "
                         f"{_compute_difference(record.train_gflop, reference, compute_tolerance)}")
    if record.split != reference.split:
        found.append(f"{record.model}: trained on {record.split}, {reference.model} on {reference.split}")
    return [v for v in found if v]
