"""`restore-bench tune`: same trials for every cell, held-out images never overlap, the tuned suite runs as it is."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
import tomllib
import torch
from click.testing import CliRunner

from benchmarks.cli import main
from benchmarks.runner import run_suite
from benchmarks.suites import load_suite, parse_suite
from benchmarks.tune import held_out
from restore.app.io import write_png
from restore.methods import Float, register_method


@register_method("tune-test-scale", blind=True, model="none", default_nfe=1, space={"factor": Float(0.3, 1.5)})
def _scale(model, y, op, *, nfe, generator=None, callback=None, class_labels=None, factor: float = 0.4):
    """Scale the measurement: PSNR peaks at factor 1 on the identity-like box operator (outside the hole)."""
    return y * factor


@register_method("tune-test-auto", blind=True, model="none", default_nfe=1, space={"factor": Float(0.3, 1.5)})
def _auto(model, y, op, *, nfe, generator=None, callback=None, class_labels=None, factor: float | None = None):
    """Like tune-test-scale, with a default chosen inside the method (None in the signature)."""
    return y * (0.4 if factor is None else factor)


@pytest.fixture
def suite_file(tmp_path):
    folder = tmp_path / "images"
    x = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for i in range(10):
        write_png(x[i], folder / f"im{i}.png")
    path = tmp_path / "suite.toml"
    path.write_text(f'dataset = "{folder}"\nimages = 4\noperators = ["box:size=4"]\nmetrics = ["psnr"]\n'
                    'batch_size = 4\n[[methods]]\nname = "identity"\nnfe = [0]\n'
                    '[[methods]]\nname = "tune-test-scale"\nnfe = [1, 2]\n')
    return path


def test_held_out_images_follow_the_evaluation_images_and_never_overlap(suite_file):
    suite = load_suite(suite_file)
    assert (held_out(suite, 3).start, held_out(suite, 3).images) == (4, 3)
    with pytest.raises(ValueError, match="overlap the evaluation images"):
        held_out(suite, 3, start=2)
    everything = parse_suite({"dataset": suite.dataset, "operators": ["box:size=4"],
                              "methods": [{"name": "identity", "nfe": [0]}]}, "all")
    with pytest.raises(ValueError, match="give a held-out split"):
        held_out(everything, 3)


def test_tune_gives_every_cell_the_same_trials_and_writes_a_runnable_suite(suite_file, tmp_path):
    out = tmp_path / "tune"
    args = ["tune", str(suite_file), "--out", str(out), "--trials", "5", "--held-out-images", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    tuned_path = out / "suite-tuned.toml"
    assert json.loads(result.stdout.strip().splitlines()[-1])["tuned_suite"] == str(tuned_path)
    record = tomllib.loads(tuned_path.read_text())["tuning"]
    assert record["held_out"]["start"] == 4 and record["held_out"]["images"] == 4
    assert record["objective"] == "psnr" and record["trials_per_cell"] == 5
    cells = {c["cell"]: c for c in record["cells"]}
    assert sorted(cells) == ["tune-test-scale|box:size=4|1", "tune-test-scale|box:size=4|2"]  # identity: no space
    for c in cells.values():
        assert c["trials"] == 5 and c["default_params"] == {"factor": 0.4} and c["best"] >= c["default"]
        assert c["best"] > c["default"] + 1.0  # factor 0.4 is far from the optimum at 1
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 10 and set(trials.groupby("cell").size()) == {5}
    assert set(trials.loc[trials["trial"] == 0, "factor"]) == {0.4}  # the defaults are trial 0 of every study

    # resuming adds nothing; the tuned suite runs as it is and its tables mark the tuned cells
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and len(pd.read_csv(out / "trials.csv")) == 10
    tuned = load_suite(tuned_path)
    assert {e.label for e in tuned.methods} == {"identity", "tune-test-scale (tuned)"}
    assert tuned.tuning["cells"][0]["best_params"]["factor"] == pytest.approx(
        next(e for e in tuned.methods if e.nfe == (1,)).hparams["factor"])
    run_suite(tuned, tmp_path / "run", progress=False)
    frame = pd.read_csv(tmp_path / "run" / "results.csv")
    assert set(frame["method"]) == {"identity", "tune-test-scale (tuned)"} and set(frame["image_id"]) == {
        f"im{i}.png" for i in range(4)}
    # reproducible from its record: the same settings in a fresh folder choose the same values (seeded TPE)
    fresh = ["tune", str(suite_file), "--out", str(tmp_path / "again"), "--trials", str(record["trials_per_cell"]),
             "--held-out-images", str(record["held_out"]["images"])]
    assert CliRunner().invoke(main, fresh).exit_code == 0
    redo = tomllib.loads((tmp_path / "again" / "suite-tuned.toml").read_text())["tuning"]
    assert [c["best_params"] for c in redo["cells"]] == [c["best_params"] for c in record["cells"]]
    bad = CliRunner().invoke(main, [*args[:4], "--objective", "lpips"])
    assert bad.exit_code != 0 and "unknown objective" in bad.output


def test_tuning_prints_the_record_of_a_tuned_suite_and_refuses_an_untuned_one(suite_file, tmp_path):
    out = tmp_path / "tune"
    assert CliRunner().invoke(main, ["tune", str(suite_file), "--out", str(out), "--trials", "2",
                                     "--held-out-images", "4"]).exit_code == 0
    tuned = out / "suite-tuned.toml"
    record = tomllib.loads(tuned.read_text())["tuning"]
    md = CliRunner().invoke(main, ["tuning", str(tuned)])
    assert md.exit_code == 0, md.output
    assert "4 held-out images" in md.output and "2 trials per cell" in md.output
    rows = [line for line in md.output.splitlines() if line.startswith("| tune-test-scale")]
    assert len(rows) == 2 and all("factor=0.4 " in r for r in rows)  # the default values of both cells
    csv = CliRunner().invoke(main, ["tuning", str(tuned), "--format", "csv"])
    frame = pd.read_csv(io.StringIO(csv.output))
    assert frame["NFE"].tolist() == [1, 2]
    assert frame["tuned"].tolist() == pytest.approx([c["best"] for c in record["cells"]])
    assert frame["default"].tolist() == pytest.approx([c["default"] for c in record["cells"]])
    untuned = CliRunner().invoke(main, ["tuning", str(suite_file)])
    assert untuned.exit_code != 0 and "no [tuning] record" in untuned.output


def test_a_tuned_suite_run_on_other_weights_is_flagged(suite_file):
    """Tuned values belong to the weights they were tuned on: the plan names every alias whose weights differ."""
    from benchmarks.runner.plan import make_plan
    from restore.engine.checkpoints import weights_sha256

    base = {"dataset": load_suite(suite_file).dataset, "operators": ["box:size=4"], "models": {"edm": "edm-cifar10"},
            "methods": [{"name": "ddnm", "model": "edm", "nfe": [1]}]}
    same = {"models": {"edm": weights_sha256("edm-cifar10")}}
    assert make_plan(parse_suite({**base, "tuning": same}, "same"), limit=1).tuning_mismatches == ()
    other = make_plan(parse_suite({**base, "tuning": {"models": {"edm": "0" * 64}}}, "other"), limit=1)
    assert len(other.tuning_mismatches) == 1 and "'edm'" in other.tuning_mismatches[0]
    with pytest.warns(UserWarning, match="tuned on other weights"):
        summary = run_suite(parse_suite({**base, "tuning": {"models": {"edm": "0" * 64}}}, "other"),
                            suite_file.parent / "run-other", limit=1, progress=False)
    assert summary["tuning_mismatches"] == list(other.tuning_mismatches)


def test_the_default_trial_leaves_a_none_default_to_the_method(suite_file, tmp_path):
    from benchmarks.tune import tune_suite, tuning_frame

    suite = parse_suite({"dataset": load_suite(suite_file).dataset, "images": 4, "operators": ["box:size=4"],
                         "metrics": ["psnr"], "methods": [{"name": "tune-test-auto", "nfe": [1]},
                                                          {"name": "tune-test-scale", "nfe": [1]}]}, "s")
    record = tomllib.loads(tune_suite(suite, tmp_path, trials=2, held_out_images=4, echo=lambda _: None).read_text())
    auto, scale = record["tuning"]["cells"]
    assert auto["default_params"] == {} and auto["default"] == pytest.approx(scale["default"])  # both ran 0.4
    assert tuning_frame(record["tuning"])["default values"].tolist() == ["factor=(the method's)", "factor=0.4"]


def test_a_tuned_suite_is_tuned_further_for_the_methods_added_since(suite_file, tmp_path):
    """Adding a method to a tuned suite and tuning again tunes only the new cells, keeps the tuned entries and their
    records, and refuses another protocol or other weights."""
    from benchmarks.tune import tune_suite

    first = tune_suite(load_suite(suite_file), tmp_path / "first", trials=2, held_out_images=4, echo=lambda _: None)
    document = tomllib.loads(first.read_text())
    document["methods"].append({"name": "tune-test-auto", "nfe": [1]})
    grown = parse_suite(document, document["name"])
    ran = []
    tuned = tune_suite(grown, tmp_path / "second", trials=2, held_out_images=4, echo=ran.append)
    assert ran == ["[tune] tune-test-auto|box:size=4|1: 2 trial(s) of 2"]  # only the new cell
    after = tomllib.loads(tuned.read_text())
    assert after["name"] == document["name"]
    assert [c["cell"] for c in after["tuning"]["cells"]] == [
        "tune-test-scale|box:size=4|1", "tune-test-scale|box:size=4|2", "tune-test-auto|box:size=4|1"]
    assert after["tuning"]["cells"][:2] == document["tuning"]["cells"]
    kept = [m for m in after["methods"] if m["label"] == "tune-test-scale (tuned)"]
    assert kept == [m for m in document["methods"] if m.get("label") == "tune-test-scale (tuned)"]
    assert {m["label"] for m in after["methods"]} == {"identity", "tune-test-scale (tuned)", "tune-test-auto (tuned)"}

    with pytest.raises(ValueError, match="another protocol.*trials_per_cell 2 -> 3"):
        tune_suite(grown, tmp_path / "third", trials=3, held_out_images=4)
    document["models"] = {"edm": "edm-cifar10"}
    document["tuning"]["models"] = {"edm": "0" * 64}
    with pytest.raises(ValueError, match="other weights for model 'edm'"):
        tune_suite(parse_suite(document, document["name"]), tmp_path / "fourth", trials=2, held_out_images=4)


def test_tuning_on_other_weights_keeps_the_suites_references_and_comments(suite_file, tmp_path):
    """--model tunes on weights not yet bundled (a campaign's): the tuned file keeps the suite's model names and its
    leading comments, and its record holds the sha256 of the weights the trials ran on."""
    from benchmarks.tune import tune_suite
    from restore.engine.checkpoints import save_model, weights_sha256
    from restore.engine.networks import UNet, UNetConfig
    from restore.engine.wrappers import EDMDenoiser

    torch.manual_seed(0)
    weights = save_model(EDMDenoiser(UNet(UNetConfig.preset("cifar-tiny"))), tmp_path / "edm.safetensors")
    suite_file.write_text("# a DDNM suite\n# on the bundled prior\n"
                          + suite_file.read_text().replace('name = "tune-test-scale"\nnfe = [1, 2]',
                                                           'name = "ddnm"\nmodel = "edm"\nnfe = [1]')
                          + '[models]\nedm = "edm-cifar10"\n')
    tuned = tune_suite(load_suite(suite_file), tmp_path / "tune", trials=1, held_out_images=4,
                       models={"edm": str(weights)}, echo=lambda _: None)
    text = tuned.read_text()
    assert text.startswith("# a DDNM suite\n# on the bundled prior\n")
    document = tomllib.loads(text)
    assert document["models"] == {"edm": "edm-cifar10"}
    assert document["tuning"]["models"] == {"edm": weights_sha256(weights)} != {"edm": weights_sha256("edm-cifar10")}
    with pytest.raises(ValueError, match="no model alias bcm"):
        tune_suite(load_suite(suite_file), tmp_path / "bad", trials=1, held_out_images=4, models={"bcm": str(weights)})
