"""The fairness check of a suite's trained models (`restore-bench models`, ``run.json["models"]``).

Each checkpoint's :class:`restore.records.fairness.TrainingRecord` (size, data split, images seen, training compute,
training time) is compared with a reference model -- by default the suite's first BCM, the method the comparison is
about -- under the rules of :mod:`restore.records.fairness`. Every model row says which form of the budget rule it
keeps (``same budget``: images, compute or both); models whose card records no training compute are listed in
``compute_not_recorded`` (their compute form is not checked: they must match the images).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from restore.records.fairness import (
    COMPUTE_TOLERANCE,
    TOLERANCE,
    budget_matches,
    format_gflop,
    training_record,
    violations,
)

NOT_RECORDED = "not recorded"


def fairness_report(refs: list[str], reference: str | None = None, tolerance: float = TOLERANCE,
                    compute_tolerance: float = COMPUTE_TOLERANCE) -> dict[str, Any]:
    """``{"reference", "tolerance", "compute_tolerance", "models": [record rows], "violations": [sentences],
    "compute_not_recorded": [models]}`` for the checkpoints ``refs``."""
    records = [training_record(r) for r in refs]
    if not records:
        return {"reference": None, "tolerance": tolerance, "compute_tolerance": compute_tolerance, "models": [],
                "violations": [], "compute_not_recorded": []}
    if reference is None:
        ref = next((r for r in records if r.wrapper == "bcm"), records[0])
    else:
        ref = training_record(reference)
    found = [v for r in records for v in violations(r, ref, tolerance, compute_tolerance)]  # the reference too
    rows = []
    for r in records:
        same = "reference" if r == ref else ", ".join(budget_matches(r, ref, compute_tolerance)) or "no"
        row = r.row()
        rows.append({**{k: v for k, v in row.items() if k not in ("train s", "host")}, "same budget": same,
                     "train s": row["train s"], "host": row["host"]})
    unrecorded = list(dict.fromkeys(r.model for r in [*records, ref] if r.train_gflop is None))
    return {"reference": ref.model, "tolerance": tolerance, "compute_tolerance": compute_tolerance, "models": rows,
            "violations": found, "compute_not_recorded": unrecorded}


def render_fairness(report: dict[str, Any]) -> str:
    """The report as a Markdown table of the models followed by the rule violations (or that there are none)."""
    if not report["models"]:
        return "The suite uses no trained models."
    table = pd.DataFrame(report["models"])
    def count(v) -> str:
        return f"{int(v):,}"

    formats = {"params": count, "backbone params": count, "images seen": count, "GFLOP/image": format_gflop,
               "train GFLOP": format_gflop}
    for column, form in formats.items():
        missing = NOT_RECORDED if column in ("GFLOP/image", "train GFLOP") else "–"
        table[column] = [missing if v is None or pd.isna(v) else form(v) for v in table[column]]
    table = table.astype(object).where(lambda f: f.notna(), "–")
    tolerance, compute_tolerance = report["tolerance"], report.get("compute_tolerance", COMPUTE_TOLERANCE)
    lines = [table.to_markdown(index=False, disable_numparse=True), "",
             f"Reference: {report['reference']}. Rules: backbone parameters within ±{tolerance:.0%}, the same "
             f"training images seen or training compute within ±{compute_tolerance:.0%}, and the same data split."]
    lines += [f"- VIOLATION {v}" for v in report["violations"]] or ["All models follow the rules."]
    unrecorded = report.get("compute_not_recorded") or []
    if unrecorded:
        lines.append(f"Training compute not recorded (cards from before it was measured) for {', '.join(unrecorded)}: "
                     "compute not checked, these models are compared by images seen.")
    return "\n".join(lines)
