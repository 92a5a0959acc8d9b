"""Fairness rules: training records from checkpoints, rule checks, `restore-train --match`, `restore-bench models`."""

from __future__ import annotations

import dataclasses
import json
import shlex

import pytest
from click.testing import CliRunner

from benchmarks.cli import main as bench
from benchmarks.fairness import fairness_report
from restore.engine.checkpoints import load_model, save_model
from restore.engine.networks.unet import UNet, UNetConfig, count_parameters
from restore.engine.wrappers import EDMDenoiser
from restore.records.fairness import TrainingRecord, backbone_parameters, training_record, violations
from training.cli import main as train


def _train(*args):
    return CliRunner().invoke(train, [str(a) for a in args])


@pytest.fixture
def reference(tmp_path, npz, single_thread):
    """A tiny BCM trained for 3 steps of batch 4 (12 images) and exported with its card."""
    run = tmp_path / "bcm"
    result = _train("bcm", "--data", npz, "--out", run, "--preset", "cifar-tiny", "--steps", 3, "--batch", 4,
                    "--no-progress")
    assert result.exit_code == 0, result.output
    assert _train("export", run, tmp_path / "bcm.safetensors").exit_code == 0
    return tmp_path / "bcm.safetensors"


def test_backbone_leaves_out_only_the_bcm_u_branch():
    config = UNetConfig.preset("cifar-tiny", img_resolution=16)
    plain = UNet(config)
    bidirectional = UNet(dataclasses.replace(config, bidirectional=True))
    assert backbone_parameters(plain) == count_parameters(plain)
    assert backbone_parameters(bidirectional) == count_parameters(plain) < count_parameters(bidirectional)
    assert backbone_parameters(EDMDenoiser(plain)) == count_parameters(plain)  # through a wrapper too


def test_record_reads_recipe_and_budget(reference, npz):
    record = training_record(reference)
    assert (record.wrapper, record.data, record.batch, record.preset, record.images) == ("bcm", str(npz), 4,
                                                                                         "cifar-tiny", 12)
    assert record.split == str(npz) and record.train_seconds > 0
    assert record.parameters == count_parameters(load_model(reference).net) > record.backbone_parameters


def test_rules():
    ref = TrainingRecord("ref", "bcm", 110, 100, data="cifar10", images=1000)
    assert violations(dataclasses.replace(ref, model="a", parameters=104), ref) == []
    assert violations(dataclasses.replace(ref, model="a", backbone_parameters=105), ref) == []
    [params] = violations(dataclasses.replace(ref, model="a", backbone_parameters=106), ref)
    assert "+6.0%" in params and "±5%" in params
    [images] = violations(dataclasses.replace(ref, model="a", images=999), ref)
    assert "999" in images
    [split] = violations(dataclasses.replace(ref, model="a", limit_images=500), ref)
    assert "cifar10[:500]" in split
    assert "no model card" in violations(dataclasses.replace(ref, model="a", images=None), ref)[0]


def test_match_trains_under_the_rules(reference, tmp_path, npz, single_thread):
    out = tmp_path / "palette"
    result = _train("palette", "--operator", "box:size=8", "--match", reference, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"] == 12  # steps and batch came from the reference
    assert _train("export", out, tmp_path / "palette.safetensors").exit_code == 0
    report = fairness_report([str(reference), str(tmp_path / "palette.safetensors")])
    assert report["reference"] == str(reference) and report["violations"] == []
    # the stored options re-apply on resume, and the card's recipe (which spells out --steps) re-runs as is
    again = _train("palette", "--out", out, "--no-progress")
    assert again.exit_code == 0 and json.loads(again.output)["step"] == 3
    recipe = load_model(tmp_path / "palette.safetensors").card["recipe"]
    assert "--match" in recipe and "--steps 3" in recipe
    words = shlex.split(recipe)[1:-2] + ["--out", str(tmp_path / "again"), "--no-progress"]
    assert _train(*words).exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--steps", 5], "sets the budget to its 12 training images (3 steps of 4)"),
    (["--images", 8], "drop --steps"),
    (["--limit-images", 6], "--limit-images all images"),
    (["--batch", 5], "does not divide"),
    (["--preset", "cifar-small"], "backbone parameters"),
])
def test_match_refuses_a_different_budget_or_size(reference, tmp_path, npz, args, message, single_thread):
    result = _train("edm", "--match", reference, "--out", tmp_path / "e", "--no-progress", *args)
    assert result.exit_code != 0 and message in result.output, result.output


def test_match_needs_a_card(tmp_path):
    bare = save_model(EDMDenoiser(UNet(UNetConfig.preset("cifar-tiny", img_resolution=16))),
                      tmp_path / "bare.safetensors")
    result = _train("edm", "--match", bare, "--out", tmp_path / "e")
    assert result.exit_code != 0 and "no card" in result.output


def test_bench_models_reports_violations(reference, tmp_path):
    other = save_model(load_model(reference), tmp_path / "uncarded.safetensors")  # same net, card dropped
    suite = tmp_path / "s.toml"
    suite.write_text(f'dataset = "cifar10"\noperators = ["box:size=8"]\n[models]\nbcm = "{reference}"\n'
                     f'edm = "{other}"\n[[methods]]\nname = "bcm-inpaint"\nmodel = "bcm"\nnfe = [1]\n'
                     '[[methods]]\nname = "ddnm"\nmodel = "edm"\nnfe = [2]\n')
    result = CliRunner().invoke(bench, ["models", str(suite)])
    assert result.exit_code == 0 and "VIOLATION" in result.output and "no model card" in result.output
    assert CliRunner().invoke(bench, ["models", str(suite), "--strict"]).exit_code == 1
    fair = CliRunner().invoke(bench, ["models", str(suite), "--model", f"edm={reference}", "--strict", "--json"])
    assert fair.exit_code == 0 and json.loads(fair.output)["violations"] == []


@pytest.mark.parametrize("suite", ["quick", "cifar10-100"])
def test_bundled_suites_keep_the_rules(suite):
    from benchmarks.suites import load_suite

    report = fairness_report(load_suite(suite).model_refs)
    assert report["reference"] == "bcm-cifar10" and len(report["models"]) == 6
    assert report["violations"] == []
