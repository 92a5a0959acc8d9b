"""The provenance record written next to every result and training run: versions, git state, host, device."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
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


_PACKAGES = ("bcm-restore", "numpy", "pillow", "kornia", "torch-fidelity", "safetensors", "pandas")


def environment(device: str | torch.device | None = None, world_size: int = 1) -> dict[str, Any]:
    """The one provenance record (run.json of `restore run` and of a benchmark run, config.json of a training
    run): python, platform, host, package versions, git state, device and process layout, command line, time."""
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    versions.update(torch=torch.__version__, cuda=torch.version.cuda)
    record = {"python": platform.python_version(), "platform": platform.platform(), "host": platform.node(),
              "versions": versions, "git": git_state(), "torch_threads": torch.get_num_threads(),
              "world_size": world_size, "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device is not None:
        dev = torch.device(device)
        record["device"] = {"type": dev.type, "name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                            else platform.processor()}
    return record
