"""`restore-bench curve`: every EMA snapshot of a run scored and placed on its measured training compute."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from benchmarks.cli import main as bench
from benchmarks.curves import snapshots
from restore.records.runs import log_seconds, run_config
from training.cli import main as train


def _invoke(cli, *args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def runs(tmp_path, npz, single_thread):
    """A 4-step EDM prior, a BCM distilled from it and a Palette model, each with snapshots every 2 steps."""
    common = ("--data", npz, "--batch", 4, "--steps", 4, "--ckpt-every", 2, "--log-every", 1, "--no-progress")
    _invoke(train, "edm", "--out", tmp_path / "edm", "--preset", "cifar-tiny", *common)
    _invoke(train, "bcm", "--out", tmp_path / "bcd", "--teacher", tmp_path / "edm" / "ema.safetensors", *common)
    _invoke(train, "palette", "--out", tmp_path / "palette", "--preset", "cifar-tiny", "--operator",
            "box:size=8", *common)
    return tmp_path


def test_curve_scores_every_snapshot_on_the_compute_axis(runs, npz, monkeypatch):
    out = runs / "points.csv"
    args = ("curve", runs / "edm", runs / "bcd", runs / "palette", "--out", out, "--reference", npz, "--test", npz,
            "--n", 4, "--edm-nfe", 3, "--bcm-nfe", "1", "--restore-nfe", 2, "--device", "cpu",
            "--plot", runs / "curves.png")
    _invoke(bench, *args)
    frame = pd.read_csv(out)
    assert [s for s, _ in snapshots(runs / "edm")] == [2, 4]
    assert sorted(set(zip(frame["run"], frame["step"]))) == [(r, s) for r in ("bcd", "edm", "palette") for s in (2, 4)]
    metrics = frame.groupby("run")["metric"].agg(lambda m: sorted(set(m))).to_dict()
    assert metrics == {"edm": ["fid", "kid"], "bcd": ["fid", "inversion_mse", "kid"],
                       "palette": ["fid", "kid", "psnr"]}
    assert set(frame["recipe"]) == {"edm", "bcd", "palette box:size=8"}
    edm_per_image = run_config(runs / "edm")["compute"]["gflop_per_image"]
    teacher = 4 * 4 * edm_per_image  # the EDM run's whole compute is the distilled student's prior
    bcd = frame[frame["run"] == "bcd"].iloc[0]
    assert bcd["prior_gflop"] == pytest.approx(teacher)
    assert bcd["total_gflop"] == pytest.approx(bcd["step"] * 4 * bcd["gflop_per_image"] + teacher)
    edm = frame[frame["run"] == "edm"].set_index("step")
    assert edm.loc[4, "train_gflop"].iloc[0] == pytest.approx(16 * edm_per_image)
    assert edm.loc[2, "train_seconds"].iloc[0] < edm.loc[4, "train_seconds"].iloc[0]
    assert set(frame.loc[frame["metric"] == "inversion_mse", "nfe"]) == {2.0, 3.0}  # 1 and 2 jumps up, 1 down
    assert (runs / "curves.png").stat().st_size > 0

    # Run again with one more run: the scored snapshots are kept, not scored again.
    before = len(frame)
    monkeypatch.setattr("benchmarks.curves.score_snapshot", lambda *a, **k: pytest.fail("scored twice"))
    _invoke(bench, *args)
    assert len(pd.read_csv(out)) == before


def test_log_seconds_counts_a_restarted_window_once(tmp_path):
    records = [{"step": 1, "images": 4, "images_per_s": 4.0}, {"step": 2, "images": 8, "images_per_s": 4.0},
               {"step": 2, "images": 8, "images_per_s": 2.0}]  # killed after step 2's log, resumed from step 1
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [t for _, t in log_seconds(tmp_path)] == [1.0, 2.0, 4.0]
