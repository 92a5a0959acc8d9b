"""The provenance record written next to every result and checkpoint: versions, git commit, host, device."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, or None outside a git checkout."""
    out = _git("rev-parse", "HEAD")
    return out.stdout.strip() or None if out is not None and out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``{"commit": HEAD or None, "dirty": tracked files modified}`` (no "dirty" outside a checkout)."""
    commit = git_commit()
    if commit is None:
        return {"commit": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status is not None and status.stdout.strip())}


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """Versions (torch, python), git commit, host, command line and, when given, the device."""
    record = {"torch": torch.__version__, "python": platform.python_version(), "git": git_commit(),
              "host": platform.node(), "argv": sys.argv}
    if device is not None:
        record["device"] = str(device)
    return record
