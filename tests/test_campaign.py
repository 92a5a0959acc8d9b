"""`restore-train --budget-gflop` and `restore-train campaign`: the reference set at one compute budget, end to end
on CPU at a tiny budget, resumable, refusing a changed budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from restore.engine.checkpoints import load_model, read_metadata
from restore.records.fairness import COMPUTE_TOLERANCE, training_record
from training.campaign import reference_set
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
