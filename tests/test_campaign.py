"""`restore-train --budget-gflop` and `restore-train campaign`: the reference set at one compute budget, end to end
on CPU at a tiny budget, resumable, refusing a changed budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from restore.engine.checkpoints import load_model, read_metadata
from restore.records.fairness import COMPUTE_TOLERANCE, training_record
from training.campaign import _argv, reference_set
from training.cli import main as train

BUDGET = 40.0  # GFLOP: a few steps of batch 4 on 16x16 images


def _train(*args):
    return CliRunner().invoke(train, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), y=np.zeros(12, dtype=np.int64))
    return path


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("campaign")
    result = _train("campaign", "--budget", BUDGET, "--out", out, "--data", data, "--batch", 4, "--device", "cpu",
                    "--jobs", 2, "--ckpt-every", 2)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def test_campaign_trains_the_reference_set_at_one_compute_budget(campaign):
    out, status = campaign
    names = [m.name for m in reference_set("tiny")]
    assert sorted(status) == sorted(names) and len(names) == 8
    for name in names:
        assert status[name]["finished"] and status[name]["rc"] == 0
        record = training_record(out / "models" / f"{name}.safetensors")  # exported with its card
        assert abs(record.train_gflop / BUDGET - 1) <= COMPUTE_TOLERANCE, (name, record.train_gflop)
        recipe = read_metadata(out / "models" / f"{name}.safetensors")["card"]["recipe"]
        assert "--budget-gflop 40" in recipe and record.batch == 4
    steps = {name: status[name]["step"] for name in names}
    assert steps["bcm-tiny"] < steps["edm-tiny"] / 2  # a BCD image costs over twice an EDM image
    card = read_metadata(out / "models" / "bcm-tiny.safetensors")["card"]
    assert "--teacher" in card["recipe"] and str(out / "edm-tiny" / "ema.safetensors") in card["recipe"]
    assert load_model(out / "models" / "palette-tiny-sr2.safetensors").wrapper_config()["operator"].startswith("down")
    assert json.loads((out / "campaign.json").read_text())["members"]["i2sb-tiny-box16"]["finished"]


def test_campaign_rerun_continues_and_changed_settings_are_refused(campaign, data):
    out, status = campaign
    before = (out / "edm-tiny" / "ema.safetensors").read_bytes()
    again = _train("campaign", "--budget", BUDGET, "--out", out, "--data", data, "--batch", 4, "--device", "cpu",
                   "--ckpt-every", 2, "--only", "edm-tiny")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["edm-tiny"]["step"] == status["edm-tiny"]["step"]
    assert (out / "edm-tiny" / "ema.safetensors").read_bytes() == before  # nothing trained twice
    other = _train("campaign", "--budget", 2 * BUDGET, "--out", out, "--data", data, "--batch", 4)
    assert other.exit_code != 0 and "other settings" in other.output and "budget_gflop" in other.output
    unknown = _train("campaign", "--budget", BUDGET, "--out", out, "--data", data, "--only", "nope")
    assert unknown.exit_code != 0 and "no member nope" in unknown.output


def test_campaign_student_waits_for_an_unfinished_teacher(tmp_path, data):
    result = _train("campaign", "--budget", BUDGET, "--out", tmp_path, "--data", data, "--batch", 4, "--device",
                    "cpu", "--only", "bcm-tiny")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout.strip().splitlines()[-1])
    assert status["bcm-tiny"] == {"rc": None, "finished": False, "waiting_for": "edm-tiny"}
    assert not (tmp_path / "bcm-tiny").exists()


def test_budget_gflop_sets_the_steps_from_the_measured_compute(tmp_path, data, single_thread):
    result = _train("edm", "--data", data, "--out", tmp_path / "edm", "--preset", "cifar-tiny", "--batch", 4,
                    "--budget-gflop", 25, "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    per_image = json.loads((tmp_path / "edm" / "config.json").read_text())["compute"]["gflop_per_image"]
    assert summary["step"] == round(25 / (per_image * 4)) and summary["finished"]
    clash = _train("edm", "--data", data, "--out", tmp_path / "edm2", "--batch", 4, "--budget-gflop", 25,
                   "--steps", 1, "--no-progress")
    assert clash.exit_code != 0 and "drop --steps" in clash.output


def test_campaign_continues_on_another_machine_from_exported_models(campaign, data, tmp_path):
    """Run folders stay behind; exports travel. A finished export is adopted as it is, an unfinished one is trained
    on from its EMA until the budget, counting its first segment, and the card lists both segments."""
    out, _ = campaign
    member = next(m for m in reference_set("tiny") if m.name == "palette-tiny-jpeg10")
    settings = dict(data=str(data), preset="cifar-tiny", batch=4, budget_gflop=BUDGET, ckpt_every=2, bf16=False,
                    limit_images=None, device="cpu")
    first = _train(*_argv(member, tmp_path / "machine1", settings, None)[3:], "--chunk", 1)
    assert first.exit_code == 0, first.output
    bundle = tmp_path / "bundle"
    assert _train("export", tmp_path / "machine1" / member.name, bundle / f"{member.name}.safetensors").exit_code == 0
    assert not read_metadata(bundle / f"{member.name}.safetensors")["card"]["budget"]["finished"]
    (bundle / "edm-tiny.safetensors").write_bytes((out / "models" / "edm-tiny.safetensors").read_bytes())

    result = _train("campaign", "--budget", BUDGET, "--out", tmp_path / "machine2", "--data", data, "--batch", 4,
                    "--device", "cpu", "--ckpt-every", 2, "--only", f"edm-tiny,{member.name}",
                    "--continue-from", bundle)
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout.strip().splitlines()[-1])
    models = tmp_path / "machine2" / "models"
    assert status["edm-tiny"]["from"] == str(bundle / "edm-tiny.safetensors") and status["edm-tiny"]["finished"]
    assert (models / "edm-tiny.safetensors").read_bytes() == (bundle / "edm-tiny.safetensors").read_bytes()
    assert not (tmp_path / "machine2" / "edm-tiny").exists()  # nothing retrained
    assert status[member.name]["finished"]
    budget = read_metadata(models / f"{member.name}.safetensors")["card"]["budget"]
    first_segment, second = budget["segments"]
    assert first_segment["steps"] == 1 and "restart" not in first_segment and "--init-continues" in second["restart"]
    assert budget["steps"] == 1 + second["steps"] and budget["images"] == 4 * budget["steps"]
    assert abs(budget["train_gflop"] / BUDGET - 1) <= COMPUTE_TOLERANCE and budget["finished"]
    assert training_record(models / f"{member.name}.safetensors").train_gflop == budget["train_gflop"]

    # bundling the continued run onto the file it started from leaves its resume as it was
    assert _train("export", tmp_path / "machine2" / member.name, bundle / f"{member.name}.safetensors").exit_code == 0
    again = _train("campaign", "--budget", BUDGET, "--out", tmp_path / "machine2", "--data", data, "--batch", 4,
                   "--device", "cpu", "--ckpt-every", 2, "--only", member.name, "--continue-from", bundle)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])[member.name]["step"] == status[member.name]["step"]


def test_init_continues_needs_a_restartable_segment(tmp_path, data, campaign):
    out, _ = campaign
    alone = _train("edm", "--data", data, "--out", tmp_path / "a", "--init-continues", "--steps", 1)
    assert alone.exit_code != 0 and "needs --init" in alone.output
    bcm = out / "models" / "bcm-tiny.safetensors"
    consistency = _train("bcm", "--data", data, "--out", tmp_path / "b", "--init", bcm, "--init-continues")
    assert consistency.exit_code != 0 and "curriculum" in consistency.output
    spent = _train("edm", "--data", data, "--out", tmp_path / "c", "--init", out / "models" / "edm-tiny.safetensors",
                   "--init-continues", "--budget-gflop", BUDGET / 2, "--batch", 4, "--preset", "cifar-tiny")
    assert spent.exit_code != 0 and "already spent" in spent.output
