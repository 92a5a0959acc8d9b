"""The provenance record written next to every result and checkpoint: versions, git commit, host, device."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """Versions (torch, python), git commit, host, command line and, when given, the device."""
    record = {"torch": torch.__version__, "python": platform.python_version(), "git": git_commit(),
              "host": platform.node(), "argv": sys.argv}
    if device is not None:
        record["device"] = str(device)
    return record
