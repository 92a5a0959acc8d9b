"""Reading a `restore-train` run folder: what was trained (config.json), how far (state.json) and how fast (log.jsonl).

The trainer (``training``) writes these files; the model cards (``restore-train export``) and the learning curves
(``benchmarks.curves``) read them through this module, so the folder's layout is known in one place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_JSON", "LOG_JSONL", "STATE_JSON", "log_seconds", "run_compute", "run_config", "run_progress"]

CONFIG_JSON = "config.json"  # the run's recipe, measured compute and environment
STATE_JSON = "state.json"  # the saved step and images (names the tensor file of that step)
LOG_JSONL = "log.jsonl"  # one record per logged window: step, images, losses, images_per_s


def run_config(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / CONFIG_JSON).read_text())


def run_progress(run_dir: str | Path) -> dict[str, Any]:
    """The saved state's JSON (``step``, ``images``, ...)."""
    return json.loads((Path(run_dir) / STATE_JSON).read_text())


def run_compute(run_dir: str | Path) -> float | None:
    """Training GFLOP spent so far (saved images x measured GFLOP per image), None for runs from before compute
    was measured."""
    per_image = (run_config(run_dir).get("compute") or {}).get("gflop_per_image")
    return None if per_image is None else run_progress(run_dir)["images"] * per_image


def log_seconds(run_dir: str | Path) -> list[tuple[dict, float]]:
    """Each log record of a run with the training seconds spent up to it (from the per-window throughput). A
    restarted run re-logs from its last saved step: such a window is counted from the last logged step before it."""
    lines = (Path(run_dir) / LOG_JSONL).read_text().splitlines()
    out, seconds, logged = [], 0.0, [0]
    for r in (json.loads(line) for line in lines if line.strip()):
        previous = max(i for i in logged if i < r["images"]) if r["images"] <= logged[-1] else logged[-1]
        seconds += (r["images"] - previous) / r["images_per_s"]
        logged.append(r["images"])
        out.append((r, seconds))
    return out
