"""`restore-train campaign`: the whole reference set trained at one training-compute budget, in resumable chunks.

The reference set is the EDM prior, the BCM (by the recipe chosen from the learning curves,
docs/results/training/README.md: bidirectional consistency distillation from the campaign's own EDM prior) and the
supervised baselines Palette and I2SB for each reference task (JPEG q10, box 16, SR x2). Every member is one
``restore-train`` run with ``--budget-gflop BUDGET``: the same measured training compute for each (the fairness
rules' compute budget, :mod:`restore.records.fairness`), so the steps differ by family (a BCD image costs about
three EDM images). The BCM's teacher is the campaign's EDM prior, whose compute is its own member's; the BCM's card
names the teacher, so a reader can add it.

Nothing is stored besides the run folders and ``campaign.json`` (the budget and settings the folder was started
with; another budget on the same folder is refused). Each member is a child process running the trainer, whose
resume is exact, so the campaign can be stopped at any moment and re-run to continue: finished members return at
once, unfinished ones continue from their last saved step, and a member whose teacher is not finished waits for a
later run. Finished members are exported (fp16 safetensors + model card) to ``OUT/models/<name>.safetensors``.

Run folders do not travel between machines; exported checkpoints do. With ``continue_from`` (a folder of exported
``<name>.safetensors``, e.g. the bundled EMAs of a campaign in progress), a member with no run folder takes its
export from there: a finished one is copied to ``OUT/models/``, an unfinished one is trained on from its EMA with
``--init-continues`` (an inexact restart that its card records; its budget keeps counting the earlier segments).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from restore.engine.checkpoints import read_metadata
from restore.records.runs import CONFIG_JSON
from restore.runtime.files import write_text_atomic
from restore.runtime.signals import interrupt_on_stop

__all__ = ["TASKS", "Member", "reference_set", "run_campaign"]

# The reference tasks: (file-name suffix, operator spec), as the bundled models name them.
TASKS = (("jpeg10", "jpeg:quality=10"), ("box16", "box:size=16"), ("sr2", "down:factor=2,kernel=bicubic"))

# The recipes of the bundled models (their cards), which the learning curves compared at equal compute.
_ADAM = ("--optimizer", "adam", "--lr", "0.0005", "--lr-warmup", "100", "--ema", "0.999")
_RADAM = ("--optimizer", "radam", "--lr", "0.0002", "--ema", "0.999")
_EDM_NOISE = ("--p-mean", "-1.2", "--p-std", "1.2")


@dataclass(frozen=True)
class Member:
    """One model of the campaign: a ``restore-train`` run in ``OUT/<name>``."""

    name: str
    command: str  # restore-train subcommand
    options: tuple[str, ...]  # the recipe (data, budget, device and paths are added by the campaign)
    teacher: str | None = None  # the member whose EMA model is passed as --teacher (trained first)


def reference_set(tag: str) -> tuple[Member, ...]:
    """The campaign's models for data named ``tag`` (e.g. ``cifar10``): names as the bundled checkpoints'."""
    edm = f"edm-{tag}"
    members = [Member(edm, "edm", _ADAM + _EDM_NOISE),
               Member(f"bcm-{tag}", "bcm", _RADAM + ("--s0", "10", "--s1", "80"), teacher=edm)]
    for family, extra in (("palette", _EDM_NOISE), ("i2sb", ("--interval", "1000"))):
        members += [Member(f"{family}-{tag}-{suffix}", family, _ADAM + extra + ("--operator", spec))
                    for suffix, spec in TASKS]
    return tuple(members)


@dataclass
class _Child:
    member: Member
    process: subprocess.Popen
    stdout: Path


def _argv(member: Member, out: Path, settings: dict, minutes_left: float | None,
          continues: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "training", member.command, *member.options, "--data", settings["data"],
            "--preset", settings["preset"], "--batch", str(settings["batch"]), "--budget-gflop",
            f"{settings['budget_gflop']:.10g}", "--ckpt-every", str(settings["ckpt_every"]), "--device",
            settings["device"], "--out", str(out / member.name), "--no-progress"]
    if settings["bf16"]:
        argv.append("--bf16")
    if settings["limit_images"]:
        argv += ["--limit-images", str(settings["limit_images"])]
    if continues is not None:
        argv += ["--init", str(continues), "--init-continues"]
    if member.teacher:
        teacher = out / member.teacher / "ema.safetensors"
        if not teacher.is_file():  # a teacher taken finished from continue_from has no run folder
            teacher = out / "models" / f"{member.teacher}.safetensors"
        argv += ["--teacher", str(teacher)]
        argv.remove("--preset")  # a distilled student takes its teacher's network
        argv.remove(settings["preset"])
    if minutes_left is not None:
        argv += ["--time-limit", f"{max(minutes_left, 0.01):.3f}"]
    return argv


def _settings_file(out: Path, settings: dict) -> None:
    """Record the campaign's settings, or refuse settings other than those the folder was started with."""
    path = out / "campaign.json"
    identity = {k: v for k, v in settings.items() if k not in ("device", "jobs")}
    if path.is_file():
        stored = json.loads(path.read_text())["settings"]
        changed = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{out} is a campaign with other settings ({what}); use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps({"settings": identity, "members": {}}, indent=1), path)


def _recorded(out: Path) -> dict[str, dict]:
    return json.loads((out / "campaign.json").read_text())["members"]


def _record(out: Path, name: str, entry: dict) -> None:
    path = out / "campaign.json"
    state = json.loads(path.read_text())
    state["members"][name] = entry
    write_text_atomic(json.dumps(state, indent=1), path)


def _exported(continue_from: Path | None, out: Path, member: Member) -> tuple[Path, dict] | None:
    """``continue_from/<name>.safetensors`` and its card's budget, for a member that has no run folder in ``out``."""
    if continue_from is None or (out / member.name / CONFIG_JSON).is_file():
        return None
    path = continue_from / f"{member.name}.safetensors"
    if not path.is_file():
        return None
    budget = (read_metadata(path).get("card") or {}).get("budget") or {}
    if "finished" not in budget:
        raise ValueError(f"{path}: its card does not say whether the training finished (export it again)")
    return path, budget


def run_campaign(out: str | Path, members: tuple[Member, ...], settings: dict, *, time_limit: float | None = None,
                 jobs: int = 1, export=None, echo=print, continue_from: str | Path | None = None) -> dict[str, dict]:
    """Train ``members`` into ``out`` with ``settings`` (data, preset, batch, budget_gflop, ckpt_every, device,
    bf16, limit_images), ``jobs`` children at a time, for at most ``time_limit`` seconds in all; then export
    every finished member with ``export(run_dir, dst)``. Members without a run folder continue from their export in
    ``continue_from`` when it has one (module docstring). Returns ``{name: status}`` (also in campaign.json)."""
    out = Path(out)
    _settings_file(out, settings)
    started = time.monotonic()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    pending, running, status = list(members), [], {}
    names = {m.name for m in members}

    def minutes_left() -> float | None:
        return None if time_limit is None else (time_limit - (time.monotonic() - started)) / 60

    continue_from = None if continue_from is None else Path(continue_from)

    def adopt(member: Member, path: Path, budget: dict) -> None:
        """A finished export from ``continue_from``: copied to the models folder as the member's result."""
        dst = out / "models" / f"{member.name}.safetensors"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
        status[member.name] = {"rc": 0, "finished": True, "step": budget.get("steps"), "images": budget.get("images"),
                               "train_gflop": budget.get("train_gflop"), "model": str(dst), "from": str(path)}
        _record(out, member.name, status[member.name])
        echo(f"[campaign] {member.name}: finished in {path}, copied to {dst}")

    def launch(member: Member, continues: Path | None = None) -> None:
        stdout = out / f"{member.name}.stdout.json"
        argv = _argv(member, out, settings, minutes_left(), continues)
        echo(f"[campaign] {member.name}: {' '.join(argv[2:])}")
        with open(out / f"{member.name}.stderr.txt", "ab") as err, open(stdout, "wb") as so:
            running.append(_Child(member, subprocess.Popen(argv, stdout=so, stderr=err, env=env), stdout))

    def finish(child: _Child) -> None:
        rc, name = child.process.returncode, child.member.name
        text = child.stdout.read_text().strip().splitlines()
        result = json.loads(text[-1]) if rc == 0 and text else {}
        status[name] = {"rc": rc, "finished": bool(result.get("finished")), "step": result.get("step"),
                        "images": result.get("images"), "train_gflop": result.get("train_gflop")}
        if rc:
            status[name]["error"] = f"see {out / (name + '.stderr.txt')}"
        elif status[name]["finished"] and export is not None:
            status[name]["model"] = str(export(out / name, out / "models" / f"{name}.safetensors"))
        _record(out, name, status[name])
        echo(f"[campaign] {name}: {json.dumps(status[name])}")

    with interrupt_on_stop():  # kill: the children are stopped (and save) before the campaign exits
        try:
            while pending or running:
                for child in [c for c in running if c.process.poll() is not None]:
                    running.remove(child)
                    finish(child)
                left = minutes_left()
                for member in list(pending):
                    if len(running) >= jobs:
                        break
                    if member.teacher in names and member.teacher not in status:
                        continue  # its teacher runs first in this invocation
                    teacher = status.get(member.teacher) or _recorded(out).get(member.teacher, {})
                    pending.remove(member)
                    exported = _exported(continue_from, out, member)
                    if exported and exported[1]["finished"]:
                        adopt(member, *exported)
                    elif member.teacher and not teacher.get("finished"):
                        status[member.name] = {"rc": None, "finished": False, "waiting_for": member.teacher}
                        echo(f"[campaign] {member.name}: waits for its teacher {member.teacher} (re-run to continue)")
                    elif left is not None and left <= 0:
                        status[member.name] = {"rc": None, "finished": False, "waiting_for": "time"}
                    else:
                        launch(member, exported[0] if exported else None)
                if running:
                    time.sleep(0.2)
        finally:
            for child in running:  # stopped from outside: the trainers save their state on SIGINT
                child.process.send_signal(signal.SIGINT)
            for child in running:
                child.process.wait()
    return status
