"""Benchmark suites: TOML schema, clear errors listing valid choices, built-in suites, cell keys."""

from __future__ import annotations

import pytest

from benchmarks.runner import resolve_cells
from benchmarks.suites import METHOD_KEYS, SUITE_KEYS, builtin_suites, list_suites, load_suite, parse_suite
from restore.methods import register_method


@register_method("suite-test-any", blind=False, model="none", default_nfe=0)
def _any(model, y, op, *, nfe, generator=None, callback=None, class_labels=None, scale=1.0):
    return y


@register_method("suite-test-jpeg", blind=True, model="none", operators=("jpeg",), default_nfe=0)
def _jpeg_only(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    return y


@register_method("suite-test-bcm", blind=True, model="bcm", default_nfe=1)
def _needs_bcm(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
    return y


BASE = {
    "dataset": "cifar10",
    "operators": ["jpeg:quality=10", "box:size=8"],
    "methods": [{"name": "suite-test-any", "nfe": [0, 2]}, {"name": "suite-test-jpeg", "nfe": [0]}],
}


def suite(**changes):
    return parse_suite({**BASE, **changes}, "t")


def test_builtin_suites_load_and_list():
    names = set(builtin_suites())
    assert {"quick", "cifar10-jpeg", "cifar10-inpaint", "cifar10-sr", "bcm-paper-jpeg"} <= names
    listed = {s["name"]: s for s in list_suites()}
    assert listed["quick"]["dataset"] == "cifar10" and listed["quick"]["images"] <= 16
    assert listed["cifar10-sr"]["operators"] == ["down:factor=2,kernel=bicubic"]
    assert listed["cifar10-jpeg"]["operators"] == ["jpeg:quality=10"]
    paper = load_suite("bcm-paper-jpeg")
    assert paper.operators == ("jpeg:quality=20",) and "fid" in paper.metrics
    assert {n for m in paper.methods if m.model == "bcm" for n in m.nfe} == {1, 2, 3, 4} and paper.class_labels


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown key.*image_count.*valid keys: " + ", ".join(SUITE_KEYS)):
        suite(image_count=4)
    with pytest.raises(ValueError, match=r"methods\[0\].*unknown key.*steps.*valid keys: " + ", ".join(METHOD_KEYS)):
        suite(methods=[{"name": "suite-test-any", "nfe": [1], "steps": 3}])
    with pytest.raises(ValueError, match=r"\[fid\].*unknown key.*size"):
        suite(fid={"size": 3})


def test_bad_names_and_values_list_choices():
    with pytest.raises(ValueError, match="unknown operator 'warp'; valid operators: .*jpeg"):
        suite(operators=["warp:amount=1"])
    with pytest.raises(ValueError, match="unknown metric 'lpips'; valid: psnr, ssim"):
        suite(metrics=["lpips"])
    with pytest.raises(ValueError, match="nfe must be a non-empty list"):
        suite(methods=[{"name": "suite-test-any", "nfe": 2}])
    with pytest.raises(ValueError, match="used twice"):
        suite(methods=[{"name": "suite-test-any", "nfe": [0, 1]}, {"name": "suite-test-any", "nfe": [1]}])
    per_budget = suite(methods=[{"name": "suite-test-any", "nfe": [0]}, {"name": "suite-test-any", "nfe": [1]}])
    assert len(per_budget.methods) == 2  # one label, one entry per budget (as tuned suites write them)
    one_per_operator = suite(methods=[{"name": "suite-test-any", "nfe": [0], "operators": ["jpeg:quality=10"]},
                                      {"name": "suite-test-any", "nfe": [1], "operators": ["box:size=8"]}])
    assert [m.label for m in one_per_operator.methods] == ["suite-test-any"] * 2
    with pytest.raises(ValueError, match="used twice on one operator and NFE"):
        suite(methods=[{"name": "suite-test-any", "nfe": [1], "operators": ["jpeg:quality=10"]},
                       {"name": "suite-test-any", "nfe": [1]}])
    with pytest.raises(ValueError, match="missing required key 'operators'"):
        parse_suite({"dataset": "x", "methods": []}, "t")
    with pytest.raises(ValueError, match="built-in suites: .*quick"):
        load_suite("no-such-suite")
    # method names are checked against the registry when cells are resolved
    with pytest.raises(ValueError, match="unknown method 'nope'; registered: .*suite-test-any"):
        resolve_cells(suite(methods=[{"name": "nope", "nfe": [1]}]), "d")


def test_model_aliases_overrides_and_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "bcm.safetensors").write_bytes(b"")
    (tmp_path / "s.toml").write_text(
        'dataset = "imgs"\noperators = ["jpeg:quality=20"]\n[models]\nbcm = "ckpt/bcm.safetensors"\n'
        '[[methods]]\nname = "suite-test-any"\nnfe = [0]\n')
    s = load_suite(tmp_path / "s.toml")
    assert s.dataset == str(tmp_path / "imgs") and s.models["bcm"] == str(tmp_path / "ckpt" / "bcm.safetensors")
    assert s.with_models({"bcm": "/x.safetensors"}).models["bcm"] == "/x.safetensors"
    (tmp_path / "ckpt" / "bcm.safetensors").unlink()  # names (and paths not found there) stay as written
    assert load_suite(tmp_path / "s.toml").models["bcm"] == "ckpt/bcm.safetensors"
    with pytest.raises(ValueError, match="no model alias edm; its aliases: bcm"):
        s.with_models({"edm": "y"})
    with pytest.raises(ValueError, match="pass --model bcm=PATH"):
        resolve_cells(suite(models={"bcm": ""}, methods=[{"name": "suite-test-bcm", "model": "bcm", "nfe": [1]}]), "d")
    with pytest.raises(ValueError, match="needs a 'bcm' model: set model"):
        resolve_cells(suite(methods=[{"name": "suite-test-bcm", "nfe": [1]}]), "d")
    with pytest.raises(ValueError, match="needs no model"):
        resolve_cells(suite(methods=[{"name": "suite-test-any", "model": "m.safetensors", "nfe": [0]}]), "d")


def test_cells_follow_supported_operators_and_keys_track_config():
    cells = resolve_cells(suite(), "d")
    assert [(c.operator, c.label, c.nfe) for c in cells] == [  # every method's low budgets first
        ("jpeg:quality=10", "suite-test-any", 0), ("jpeg:quality=10", "suite-test-jpeg", 0),
        ("jpeg:quality=10", "suite-test-any", 2), ("box:size=8", "suite-test-any", 0),
        ("box:size=8", "suite-test-any", 2)]
    assert len({c.key for c in cells}) == len(cells)
    changed = resolve_cells(suite(methods=[{"name": "suite-test-any", "nfe": [0, 2], "hparams": {"scale": 2.0}},
                                           {"name": "suite-test-jpeg", "nfe": [0], "label": "renamed"}]), "d")
    same = [a.key == b.key for a, b in zip(cells, changed)]
    assert same == [False, True, False, False, False]  # hparams change keys; a label does not
    assert resolve_cells(suite(batch_size=3, metrics=["psnr"]), "d")[0].key == cells[0].key


def test_method_supporting_no_suite_operator_is_an_error():
    with pytest.raises(ValueError, match="supports none of the suite's operators .*it supports: jpeg"):
        resolve_cells(suite(operators=["box:size=8"]), "d")


def test_cli_list_and_user_errors(tmp_path):
    import json

    from click.testing import CliRunner

    from benchmarks.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["list", "--json"])
    assert result.exit_code == 0 and {s["name"] for s in json.loads(result.output)} >= {"quick", "bcm-paper-jpeg"}
    assert "quick" in runner.invoke(main, ["list"]).output
    for args, message in ((["run", "nope"], "built-in suites: "),
                          (["run", "quick", "--model", "nope=x"], "no model alias nope"),
                          (["run", "quick", "--model", "bcm"], "expected ALIAS=PATH")):
        result = runner.invoke(main, [*args, "--out", str(tmp_path / "o")])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_method_entries_can_restrict_operators():
    s = suite(methods=[{"name": "suite-test-any", "nfe": [0], "operators": ["box:size=8"]}])
    assert [c.operator for c in resolve_cells(s, "d")] == ["box:size=8"]
    with pytest.raises(ValueError,
                       match="operators box:size=4 are not in the suite; its operators: jpeg:quality=10, box:size=8"):
        suite(methods=[{"name": "suite-test-any", "nfe": [0], "operators": ["box:size=4"]}])
