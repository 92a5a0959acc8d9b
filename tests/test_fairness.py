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
from restore.records.fairness import (
    TrainingRecord,
    backbone_parameters,
    budget_matches,
    compute_violation,
    format_gflop,
    training_record,
    violations,
)
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
    assert record.gflop_per_image > 0 and record.train_gflop == pytest.approx(12 * record.gflop_per_image, rel=1e-5)


def test_record_compute_from_cards_with_and_without_it(reference, tmp_path):
    card = load_model(reference).card
    without = dict(card, budget={k: v for k, v in card["budget"].items() if "gflop" not in k})  # an older card
    per_image_only = dict(card, budget={k: v for k, v in card["budget"].items() if k != "train_gflop"})
    model = load_model(reference)
    old = training_record(save_model(model, tmp_path / "old.safetensors", card=without))
    assert (old.images, old.gflop_per_image, old.train_gflop) == (12, None, None)
    assert old.row()["train GFLOP"] is None and old.row()["GFLOP/image"] is None
    partial = training_record(save_model(model, tmp_path / "partial.safetensors", card=per_image_only))
    assert partial.train_gflop == pytest.approx(12 * card["budget"]["gflop_per_image"])
    bundled = training_record("edm-cifar10")  # a campaign card: its compute is the images times the measured step
    assert bundled.images == 248_096
    assert bundled.train_gflop == pytest.approx(bundled.images * bundled.gflop_per_image, rel=1e-4)


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


def test_compute_rule_and_its_tolerance_edges():
    """Rule 2 holds with the same images OR training compute within ±10 % (inclusive); an unrecorded compute is
    never a violation by itself, but then only the same images keep the rule."""
    ref = TrainingRecord("ref", "bcm", 110, 100, data="cifar10", images=1000, gflop_per_image=6.0, train_gflop=6000.0)
    edm = dataclasses.replace(ref, model="a", gflop_per_image=2.0)
    for images, fair in ((3300, True), (2700, True), (3303, False), (2697, False), (1000, True)):
        record = dataclasses.replace(edm, images=images, train_gflop=2.0 * images)
        assert (violations(record, ref) == []) is fair, images
    assert budget_matches(dataclasses.replace(edm, images=3300, train_gflop=6600.0), ref) == ["compute"]
    assert budget_matches(dataclasses.replace(edm, train_gflop=2000.0), ref) == ["images"]  # a third of the compute
    assert budget_matches(dataclasses.replace(ref, model="a"), ref) == ["images", "compute"]
    [over] = violations(dataclasses.replace(edm, images=3303, train_gflop=6606.0), ref)
    assert "saw 3,303 training images" in over and "+10.1%" in over and "±10%" in over
    assert compute_violation(5400.0, ref) is None and "-10.1%" in compute_violation(5394.0, ref)
    # not recorded: fine with the same images, a violation (saying why) with other images
    unknown = dataclasses.replace(ref, model="a", gflop_per_image=None, train_gflop=None)
    assert violations(unknown, ref) == [] and budget_matches(unknown, ref) == ["images"]
    [why] = violations(dataclasses.replace(unknown, images=3000), ref)
    assert "compute of a is not recorded" in why
    [why] = violations(dataclasses.replace(edm, images=3000, train_gflop=6000.0),
                       dataclasses.replace(ref, gflop_per_image=None, train_gflop=None))
    assert "compute of ref is not recorded" in why


def _rerun_recipe(recipe: str, out):
    """Run a model card's recipe (``restore-train ... --out RUN_DIR``) as is, into ``out``."""
    return _train(*shlex.split(recipe)[1:-2], "--out", out, "--no-progress")


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
    assert _rerun_recipe(recipe, tmp_path / "again").exit_code == 0


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


def test_match_compute_picks_the_steps_that_match_the_compute(reference, tmp_path, single_thread):
    """One BCT step costs about three EDM steps per image, so an EDM prior matched on compute takes about three
    times the reference's 3 steps of 4: steps = reference GFLOP / (own measured GFLOP per image x batch), rounded."""
    out, ref = tmp_path / "edm", training_record(reference)
    result = _train("edm", "--match", reference, "--match-compute", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    per_image = json.loads((out / "config.json").read_text())["compute"]["gflop_per_image"]
    assert summary["step"] == round(ref.train_gflop / (per_image * 4)) == 9 and summary["images"] == 36
    assert summary["train_gflop"] == pytest.approx(36 * per_image)
    assert abs(summary["train_gflop"] / ref.train_gflop - 1) <= 0.10
    assert _train("export", out, tmp_path / "edm.safetensors").exit_code == 0
    report = fairness_report([str(reference), str(tmp_path / "edm.safetensors")])
    assert report["violations"] == [] and [m["same budget"] for m in report["models"]] == ["reference", "compute"]
    assert report["compute_not_recorded"] == []
    # resuming re-derives the same budget; the card's recipe (--match-compute --steps 9) re-runs as is
    again = _train("edm", "--out", out, "--no-progress")
    assert again.exit_code == 0 and json.loads(again.output)["step"] == 9
    recipe = load_model(tmp_path / "edm.safetensors").card["recipe"]
    assert "--match-compute" in recipe and "--steps 9" in recipe
    assert _rerun_recipe(recipe, tmp_path / "again").exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--steps", 5], "sets the budget to its"),
    (["--images", 8], "drop --steps / --images"),
    (["--batch", 24], "whole batches of 24 cannot come within ±10%"),
    (["--limit-images", 6], "--limit-images all images"),
])
def test_match_compute_refuses_a_different_budget(reference, tmp_path, args, message, single_thread):
    result = _train("edm", "--match", reference, "--match-compute", "--out", tmp_path / "e", "--no-progress", *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()[-1]) < 300 and "Traceback" not in result.output


def test_match_compute_needs_a_recorded_compute(reference, tmp_path):
    result = _train("edm", "--match-compute", "--out", tmp_path / "e")
    assert result.exit_code != 0 and "--match-compute needs --match MODEL" in result.output
    card = load_model(reference).card
    old = save_model(load_model(reference), tmp_path / "old.safetensors",
                     card=dict(card, budget={k: v for k, v in card["budget"].items() if "gflop" not in k}))
    result = _train("edm", "--match", old, "--match-compute", "--out", tmp_path / "e")
    assert result.exit_code != 0 and "records no training compute" in result.output
    assert _train("edm", "--match", old, "--out", tmp_path / "e", "--no-progress").exit_code == 0  # images: fine


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
    header = result.output.splitlines()[0]
    assert "GFLOP/image" in header and "train GFLOP" in header and "same budget" in header
    gflop = format_gflop(training_record(reference).train_gflop)
    assert f"| {gflop} " in result.output and "not recorded" in result.output  # the uncarded model
    assert CliRunner().invoke(bench, ["models", str(suite), "--strict"]).exit_code == 1
    fair = CliRunner().invoke(bench, ["models", str(suite), "--model", f"edm={reference}", "--strict", "--json"])
    assert fair.exit_code == 0 and json.loads(fair.output)["violations"] == []


@pytest.mark.parametrize("suite", ["quick", "cifar10-100"])
def test_bundled_suites_keep_the_rules(suite):
    from benchmarks.suites import load_suite

    report = fairness_report(load_suite(suite).model_refs)
    assert report["reference"] == "bcm-cifar10" and len(report["models"]) == 8
    assert report["violations"] == [] and report["compute_not_recorded"] == []
    # the campaign trained every model to one compute budget: a BCT step costs ~3.7x an EDM step per image,
    # so the baselines saw more images and keep rule 2 by compute only
    assert [m["same budget"] for m in report["models"]] == ["reference"] + ["compute"] * 7
    reference = report["models"][0]["train GFLOP"]
    assert all(abs(m["train GFLOP"] / reference - 1) <= 0.1 for m in report["models"])
