"""Shared fixtures: device, explicit RNG, and the real data in ../shared/data.

Tests that need ../shared/data skip with a clear reason when it is absent, unless
REQUIRE_SHARED_DATA=1 (set by .ci/run), where absence is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

# Both cores by default (the CI machine has 2); OMP_NUM_THREADS wins when set, e.g. on a shared box.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(os.environ.get("SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    """Path of a file in ../shared/data, or skip (fail under REQUIRE_SHARED_DATA=1) when missing."""
    path = SHARED_DATA / name
    if not path.is_file():
        reason = f"{path} not found (real data lives in ../shared/data)"
        if os.environ.get("REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason + " and REQUIRE_SHARED_DATA=1")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session", autouse=True)
def _feature_cache(tmp_path_factory):
    """Tests never write to the user's feature cache (~/.cache/bcm-restore, where a benchmark on the same machine
    looks for its FID reference): one fresh cache per test session."""
    patch = pytest.MonkeyPatch()
    patch.setenv("BCM_RESTORE_CACHE", str(tmp_path_factory.mktemp("bcm-restore-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def cifar_test_uint8() -> np.ndarray:
    """The first 256 CIFAR-10 test images, uint8 NHWC."""
    with np.load(shared_file("cifar10_test.npz"), allow_pickle=False) as f:
        return f["x"][:256].copy()


@pytest.fixture(scope="session")
def cifar_test(cifar_test_uint8) -> torch.Tensor:
    """The first 256 CIFAR-10 test images as float32 (B, 3, 32, 32) in [-1, 1]."""
    return torch.from_numpy(cifar_test_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def single_thread():
    """Tiny networks are latency-bound: one thread is as fast and avoids oversubscribing shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def npz(tmp_path) -> Path:
    """A tiny training set file: 12 random 16x16 RGB images (uint8 NHWC 'x') and labels 'y'."""
    path = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), y=np.zeros(12, dtype=np.int64))
    return path


GAUSSIAN_MU, GAUSSIAN_S = 0.3, 0.5  # Gaussian data N(mu, s^2 I) of the oracle tests


@pytest.fixture
def g():
    """The Gaussian data whose PF-ODE flow map is closed-form (docs/design.md#tests-and-oracles)."""
    from restore.engine.oracles import GaussianFlow

    return GaussianFlow(GAUSSIAN_MU, GAUSSIAN_S)


def analytic_forward_flops(model, call) -> int:
    """Closed-form multiply-add count (x2) of one forward pass: every conv 2·out·(in/groups)·k², every linear
    2·out·in, every attention block 4·S²·C per image (q kᵀ and the weighted sum of v), from hooks on the modules
    of ``model`` while ``call()`` runs."""
    from restore.engine.networks.layers import AttentionBlock

    total = [0]

    def conv(m, inputs, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inputs, out):
        total[0] += 2 * out.numel() * m.in_features

    def attention(m, inputs, out):
        b, c, h, w = inputs[0].shape
        total[0] += 4 * b * (h * w) ** 2 * c

    kinds = ((nn.Conv2d, conv), (nn.Linear, linear), (AttentionBlock, attention))
    hooks = [m.register_forward_hook(fn) for m in model.modules() for kind, fn in kinds if isinstance(m, kind)]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in hooks:
            h.remove()
    return total[0]
