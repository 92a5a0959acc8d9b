"""Resumable training state without pickle: tensors in safetensors, everything else in JSON.

``state.json`` names the tensor file of the same step (``state-<step>.safetensors``) and is replaced last and
atomically, so a crash while saving leaves the previous state intact.

Tensor keys: ``model.<name>`` (online weights and buffers), ``ema.<name>``, ``optim.<param index>.<key>``
(optimizer state tensors, e.g. Adam's ``exp_avg``), ``rng.torch`` (global CPU RNG), ``rng.cuda.<i>``.
JSON: step, images seen, optimizer ``param_groups`` and non-tensor per-parameter state, plus ``extra``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from restore.records.runs import STATE_JSON
from restore.runtime.files import atomic_path, write_text_atomic

__all__ = ["save_state", "load_state", "has_state"]



def _optim_flatten(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for idx, entries in opt_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                plain.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "plain": plain}


def _optim_unflatten(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entries in meta["plain"].items():
        state.setdefault(int(idx), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def has_state(run_dir: str | Path) -> bool:
    return (Path(run_dir) / STATE_JSON).is_file()


def save_state(run_dir: str | Path, *, step: int, images: int, model: torch.nn.Module, ema: torch.nn.Module,
               optimizer: torch.optim.Optimizer, extra: dict | None = None) -> Path:
    """Write the full resumable state of ``step`` into ``run_dir``; returns the tensor file."""
    run_dir = Path(run_dir)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    optim_tensors, optim_meta = _optim_flatten(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    name = f"state-{step:08d}.safetensors"
    with atomic_path(run_dir / name) as tmp:
        save_file(tensors, tmp)
    meta = {"step": step, "images": images, "tensors": name, "optimizer": optim_meta, "extra": extra or {}}
    old = json.loads((run_dir / STATE_JSON).read_text())["tensors"] if has_state(run_dir) else None
    write_text_atomic(json.dumps(meta, indent=1), run_dir / STATE_JSON)
    if old and old != name:
        (run_dir / old).unlink(missing_ok=True)
    return run_dir / name


def load_state(run_dir: str | Path, *, model: torch.nn.Module, ema: torch.nn.Module,
               optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG state in place; returns the JSON part (step, images, extra)."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / STATE_JSON).read_text())
    tensors = load_file(run_dir / meta["tensors"])
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    optimizer.load_state_dict(_optim_unflatten(tensors, meta["optimizer"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    return meta
