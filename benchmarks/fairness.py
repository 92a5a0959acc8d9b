"""The fairness check of a suite's trained models (`restore-bench models`, ``run.json["models"]``).

Each checkpoint's :class:`restore.records.fairness.TrainingRecord` (size, data split, images seen, training cost) is
compared with a reference model -- by default the suite's first BCM, the method the comparison is about -- under
the rules of :mod:`restore.records.fairness`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from restore.records.fairness import TOLERANCE, training_record, violations


def fairness_report(refs: list[str], reference: str | None = None, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """``{"reference", "tolerance", "models": [record rows], "violations": [sentences]}`` for the checkpoints
    ``refs``."""
    records = [training_record(r) for r in refs]
    if not records:
        return {"reference": None, "tolerance": tolerance, "models": [], "violations": []}
    if reference is None:
        ref = next((r for r in records if r.wrapper == "bcm"), records[0])
    else:
        ref = training_record(reference)
    found = [v for r in records for v in violations(r, ref, tolerance)]  # the reference itself: known or not
    return {"reference": ref.model, "tolerance": tolerance, "models": [r.row() for r in records], "violations": found}


def render_fairness(report: dict[str, Any]) -> str:
    """The report as a Markdown table of the models followed by the rule violations (or that there are none)."""
    if not report["models"]:
        return "The suite uses no trained models."
    table = pd.DataFrame(report["models"]).astype(object).where(lambda f: f.notna(), "–")
    for column in ("params", "backbone params", "images seen"):
        table[column] = [v if v == "–" else f"{v:,}" for v in table[column]]
    lines = [table.to_markdown(index=False, disable_numparse=True), "",
             f"Reference: {report['reference']}. Rules: backbone parameters within ±{report['tolerance']:.0%}, "
             "the same training images seen and the same data split."]
    lines += [f"- VIOLATION {v}" for v in report["violations"]] or ["All models follow the rules."]
    return "\n".join(lines)
