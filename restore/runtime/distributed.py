"""The distributed setup shared by training and the benchmark runner: under ``torchrun`` (``WORLD_SIZE`` > 1)
each process joins the process group (gloo on CPU, nccl on CUDA) and takes the GPU of its ``LOCAL_RANK``;
otherwise it is rank 0 of 1."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: str | torch.device | None = None) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; ``device`` None or "auto" means cuda:LOCAL_RANK when CUDA is available,
    else cpu. A CUDA device without an index gets this process's LOCAL_RANK under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", local)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if world > 1:
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, dev


def barrier(world_size: int) -> None:
    """Wait for every process (no-op for one process)."""
    if world_size > 1 and dist.is_initialized():
        dist.barrier()
