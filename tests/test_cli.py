"""Command-line skeletons: help texts, `restore models`, `restore convert` and its one-line user errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from benchmarks.cli import main as bench_main
from restore.app.cli import main as restore_main
from restore.engine.checkpoints import load_model
from restore.engine.networks import UNet, UNetConfig
from restore.engine.wrappers import BCM
from training.cli import main as train_main


@pytest.mark.parametrize("cli", [restore_main, bench_main, train_main])
def test_help_shows_an_example(cli):
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_models_json_is_a_list():
    result = CliRunner().invoke(restore_main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    assert all({"name", "purpose", "available"} <= set(row) for row in rows)


def test_convert_round_trip_and_user_errors(tmp_path):
    config = UNetConfig.preset("cifar-tiny", img_resolution=16, attention_resolutions=(8,), bidirectional=True)
    state = UNet(config).state_dict()
    torch.save(state, tmp_path / "official.pt")
    args = ["convert", str(tmp_path / "official.pt"), str(tmp_path / "bcm.safetensors"), "--from", "bcm-ict",
            "--resolution", "16", "--head-channels", "32", "--fp16"]
    runner = CliRunner()
    result = runner.invoke(restore_main, args)
    assert result.exit_code == 0, result.output
    model = load_model(tmp_path / "bcm.safetensors")
    assert isinstance(model, BCM) and model.net.config.bidirectional
    for key, value in model.net.state_dict().items():  # dropout is not in the weights: compare those
        torch.testing.assert_close(value, state[key].half().float())

    again = runner.invoke(restore_main, args)  # refuses to overwrite
    assert again.exit_code != 0 and "exists; pass --force" in again.output

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    bad = runner.invoke(restore_main, ["convert", str(tmp_path / "junk.pt"), str(tmp_path / "x.safetensors"),
                                       "--from", "bcm-ict"])
    assert bad.exit_code == 1 and bad.output.startswith("Error:") and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_methods_lists_every_builtin_through_entry_points():
    """The entry points in pyproject register the methods of restore and baselines on first use."""
    result = CliRunner().invoke(restore_main, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    names = {row["name"] for row in json.loads(result.stdout)}
    assert {"identity", "pinv", "bicubic", "bcm-jpeg", "bcm-jpeg-dc", "bcm-inpaint", "bcm-sr", "bdia-restore",
            "dps", "pigdm", "ddrm", "ddrm-jpeg", "ddnm"} <= names


@pytest.mark.parametrize("cut", [4, 100, 100_000])
def test_restore_run_refuses_a_truncated_checkpoint_in_one_line(tmp_path, cut):
    from PIL import Image

    from restore.engine.checkpoints import resolve_model_path

    src = resolve_model_path("edm-cifar10").read_bytes()
    model = tmp_path / "truncated.safetensors"
    model.write_bytes(src[:cut])
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    result = CliRunner().invoke(restore_main, ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--operator",
                                               "jpeg:quality=10", "--method", "bcm-jpeg-dc", "--model", str(model)])
    assert result.exit_code != 0 and not isinstance(result.exception, (ValueError, RuntimeError))
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "truncated.safetensors is not a readable safetensors checkpoint" in lines[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        load_model(model)
