"""Training loop (training/loop.py), data order, `restore-train` CLI, and BCT against the exact Gaussian flow map.

Oracles: an uninterrupted run for exact resume; a permutation property for the data order; the closed-form
PF-ODE flow map of Gaussian data (restore.engine.oracles.GaussianFlow) for what BCT learns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import analytic_forward_flops
from torch import nn

from restore.engine.checkpoints import load_model, read_metadata
from restore.engine.networks.unet import UNet, UNetConfig
from restore.engine.oracles import GaussianFlow
from restore.engine.wrappers import BCM, ConsistencyModel, EDMDenoiser
from training.cli import main
from training.data import ImageData, batch_indices
from training.loop import TrainConfig, ema_beta, train
from training.losses import BCTLoss, EDMLoss

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_net(bidirectional: bool, dropout: float = 0.0, res: int = 8, channels: int = 3, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig.preset("cifar-tiny", img_resolution=res, attention_resolutions=(), dropout=dropout,
                                  bidirectional=bidirectional, in_channels=channels, out_channels=channels))


def images(n: int = 16, res: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------------------------- loop

def test_runs_saved_before_a_new_network_field_resume(tmp_path):
    """A run folder written before a UNetConfig field existed (here scale_shift_norm) resumes when the requested
    value is the field's default, and is refused when it is not."""
    config = TrainConfig(steps=4, batch=4, lr=1e-3, ckpt_every=2, log_every=1)
    train(EDMDenoiser(tiny_net(False)), EDMLoss(), images(), config, tmp_path, max_steps=2, progress=False)
    stored = json.loads((tmp_path / "config.json").read_text())
    del stored["model"]["net"]["scale_shift_norm"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert train(EDMDenoiser(tiny_net(False)), EDMLoss(), images(), config, tmp_path, progress=False).step == 4
    changed = UNet(dataclasses.replace(tiny_net(False).config, scale_shift_norm=True))
    with pytest.raises(ValueError, match="scale_shift_norm"):
        train(EDMDenoiser(changed), EDMLoss(), images(), dataclasses.replace(config, steps=6), tmp_path,
              progress=False)


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    """6 steps in one go == 3 steps + resume + 3 steps: weights, EMA and optimizer state, exactly."""
    config = TrainConfig(steps=6, batch=4, lr=1e-3, ema_rate=0.9, lr_warmup=2, grad_clip=1.0, channels_last=True,
                         ckpt_every=2, log_every=1)
    loss = BCTLoss(total_steps=6)
    data = images()

    def run(run_dir, chunks):
        for c in chunks:
            model = BCM(tiny_net(True, dropout=0.2))  # a fresh process would rebuild the model like this
            result = train(model, loss, data, config, run_dir, max_steps=c, progress=False)
        return model, result

    full, r_full = run(tmp_path / "full", [None])
    part, r_part = run(tmp_path / "part", [3, 2, None])
    assert r_full.step == r_part.step == 6 and r_part.finished and r_part.images == 24
    for (k, a), b in zip(full.state_dict().items(), part.state_dict().values()):
        assert torch.equal(a, b), k
    state = {p: json.loads((tmp_path / p / "state.json").read_text()) for p in ("full", "part")}
    assert state["full"]["optimizer"] == state["part"]["optimizer"]
    ema = [load_model(tmp_path / p / "ema.safetensors") for p in ("full", "part")]
    for (k, a), b in zip(ema[0].state_dict().items(), ema[1].state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(ema[0].net.out[2].weight, full.net.out[2].weight)  # EMA is not the online model
    logs = [[json.loads(line) for line in (tmp_path / p / "log.jsonl").read_text().splitlines()]
            for p in ("full", "part")]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert sorted(f.name for f in (tmp_path / "part" / "checkpoints").iterdir()) == [
        f"ema-{s:08d}.safetensors" for s in (2, 4, 6)]
    # the compute measured at the start (on a copy, forked RNG) is kept on resume and carried by every log line
    compute = [json.loads((tmp_path / p / "config.json").read_text())["compute"] for p in ("full", "part")]
    assert compute[0] == compute[1] and compute[0]["gflop_per_image"] > 0
    assert [r["train_gflop"] for r in logs[1]] == [pytest.approx(r["images"] * compute[0]["gflop_per_image"])
                                                   for r in logs[1]]
    assert len(list((tmp_path / "part").glob("state-*.safetensors"))) == 1

    # Finished runs do nothing, and keep the environment that trained them (a campaign re-runs finished members);
    # a changed recipe is refused with the list of differences.
    trained_in = json.loads((tmp_path / "full" / "config.json").read_text())["environment"]
    monkeypatch.setattr("training.loop.environment", lambda: {"git": {"commit": "a later commit"}})
    again = train(BCM(tiny_net(True, dropout=0.2)), loss, data, config, tmp_path / "full", progress=False)
    assert again.step == 6
    assert json.loads((tmp_path / "full" / "config.json").read_text())["environment"] == trained_in
    with pytest.raises(ValueError, match="train.lr"):
        train(BCM(tiny_net(True, dropout=0.2)), loss, data, TrainConfig(**{**config.to_dict(), "lr": 2e-3, "steps": 7}),
              tmp_path / "full", progress=False)


def test_ema_tracks_online_weights_with_rate_zero(tmp_path):
    model = EDMDenoiser(tiny_net(False))
    train(model, EDMLoss(), images(), TrainConfig(steps=2, batch=4, ema_rate=0.0, lr=1e-3), tmp_path, progress=False)
    ema = load_model(tmp_path / "ema.safetensors")
    for (k, a), b in zip(model.state_dict().items(), ema.state_dict().values()):
        assert torch.equal(a, b), k
    assert ema_beta(0, 0.999, True) == pytest.approx(0.1) and ema_beta(10**6, 0.999, True) == 0.999
    assert ema_beta(0, 0.999, False) == 0.999


def test_edm_loss_decreases(tmp_path):
    # A trivial dataset: one smooth colour pattern and its negative.
    ramp = torch.linspace(-0.8, 0.8, 8)
    pattern = torch.stack([ramp[None, :].expand(8, 8), ramp[:, None].expand(8, 8), ramp.outer(ramp)])
    data = torch.stack([pattern, -pattern]).repeat(16, 1, 1, 1)

    def eval_loss(model):
        with torch.no_grad():
            return EDMLoss()(model.eval(), data, generator=torch.Generator().manual_seed(123)).mean().item()

    model = EDMDenoiser(tiny_net(False))
    before = eval_loss(model)
    train(model, EDMLoss(), data, TrainConfig(steps=40, batch=8, lr=2e-3, optimizer="adam"), tmp_path, progress=False)
    after = eval_loss(model)
    assert after < 0.6 * before, (before, after)


def test_bf16_run_tracks_fp32(tmp_path):
    """bf16 autocast (network only) follows the fp32 loss curve; the caller's model is left as it was."""
    data = images(16)
    curves = {}
    for bf16 in (False, True):
        model = BCM(tiny_net(True))
        with torch.no_grad():
            model.net.out[2].weight.normal_(0, 0.05)  # a non-zero output so precision matters from step 0
        train(model, BCTLoss(total_steps=8), data, TrainConfig(steps=8, batch=4, lr=1e-3, bf16=bf16, log_every=1),
              tmp_path / str(bf16), progress=False)
        assert model.autocast_dtype is None
        curves[bf16] = torch.tensor([json.loads(line)["loss"] for line in (tmp_path / str(bf16) / "log.jsonl").open()])
    assert not torch.equal(curves[True], curves[False])
    # Trajectories drift apart as rounding differences compound: close early, and close on average.
    assert torch.allclose(curves[True][:4], curves[False][:4], rtol=0.02)
    assert torch.allclose(curves[True].mean(), curves[False].mean(), rtol=0.05)


def test_batch_order_is_a_sharded_permutation_per_epoch():
    n, batch = 10, 4
    full = torch.cat([batch_indices(n, batch, s, seed=3) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(full[:10].tolist()) == list(range(10)) and sorted(full[10:].tolist()) == list(range(10))
    assert not torch.equal(full[:10], full[10:])  # a fresh permutation per epoch
    for s in range(5):  # two ranks split the global batch without overlap
        ranks = [batch_indices(n, batch, s, seed=3, rank=r, world=2) for r in range(2)]
        assert torch.equal(torch.cat(ranks), batch_indices(n, batch, s, seed=3))
    assert not torch.equal(full, torch.cat([batch_indices(n, batch, s, seed=4) for s in range(5)]))


def test_image_data_formats():
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    a = ImageData(x).batch(torch.tensor([3, 1]))
    assert a.shape == (2, 3, 4, 4) and a.dtype == torch.float32
    assert torch.allclose(a[0], torch.from_numpy(x[3]).permute(2, 0, 1).float() / 127.5 - 1)
    t = ImageData(list(a)).batch(torch.tensor([1]))
    assert torch.equal(t[0], a[1]) and ImageData(x).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="uint8 NHWC"):
        ImageData(x.astype(np.float32))


# --------------------------------------------------------------------------------------------- training compute

def _net16(bidirectional: bool, dropout: float = 0.0) -> UNet:
    """cifar-tiny at 16x16: attention at the top level, so the counter must see the attention products too."""
    torch.manual_seed(0)
    return UNet(UNetConfig.preset("cifar-tiny", img_resolution=16, bidirectional=bidirectional, dropout=dropout))


def counted_forward_flops(call) -> int:
    from restore.engine.flops import flop_counter

    with torch.no_grad(), flop_counter() as counter:
        call()
    return counter.get_total_flops()


def test_flop_counter_sees_every_conv_matmul_and_attention_of_the_unet():
    x, t = images(2, res=16), torch.full((2,), 1.0)
    edm, bcm = EDMDenoiser(_net16(False)), BCM(_net16(True))
    for model, call in ((edm, lambda: edm(x, t)), (bcm, lambda: bcm.jump(x, t, t / 2))):
        expected = analytic_forward_flops(model, call)
        assert expected > 10**8 and counted_forward_flops(call) == expected
    # channels_last takes the fused CPU attention kernel, which torch's own registry does not count
    edm.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    assert counted_forward_flops(lambda: edm(x, t)) == analytic_forward_flops(edm, lambda: edm(x, t))


def test_training_flops_are_the_expected_multiple_of_a_forward_pass():
    """Per image, one step costs: EDM forward + backward ~ 3 forwards; iCT adds the target forward (~ 4); BCT
    runs target + online (1 + 3), the jump (3) and a target pass back-propagated to its input only (2): ~ 9, i.e.
    three EDM steps. Ratios, not absolute numbers (the first conv needs no input gradient: a little under)."""
    from training.flops import training_flops
    from training.losses import ICTLoss

    data, t = ImageData(images(4, res=16)), torch.full((4,), 1.0)
    x = data.batch(torch.arange(4))
    per_image = {}
    for name, model, loss in (("edm", EDMDenoiser(_net16(False)), EDMLoss()),
                              ("ct", ConsistencyModel(_net16(False)), ICTLoss(total_steps=10)),
                              ("bcm", BCM(_net16(True)), BCTLoss(total_steps=10))):
        call = functools.partial(model.jump, x, t, t / 2) if name == "bcm" else functools.partial(model, x, t)
        forward = counted_forward_flops(call) / 4
        per_image[name] = training_flops(model, loss, data)["gflop_per_image"] * 1e9
        per_image[name + "/forward"] = per_image[name] / forward
    print(per_image)
    assert per_image["edm/forward"] == pytest.approx(3, rel=0.03)
    assert per_image["ct/forward"] == pytest.approx(4, rel=0.03)
    assert per_image["bcm/forward"] == pytest.approx(9, rel=0.03)
    assert per_image["bcm"] / per_image["edm"] == pytest.approx(3, rel=0.05)


def test_measuring_flops_leaves_the_model_and_the_rng_alone():
    """On a deep copy, with its own generator, under a forked RNG: weights, gradients, dropout seeds, the
    train/eval flag, autocast and the global RNG stream are as before; per image it does not depend on the batch
    or the precision."""
    from training.flops import training_flops

    model = BCM(_net16(True, dropout=0.2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seeds = [m.seed for m in model.net._dropouts]
    rng = torch.get_rng_state()
    data, loss = ImageData(images(8, res=16)), BCTLoss(total_steps=10)
    record = training_flops(model, loss, data, bf16=True, channels_last=True, step=3, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training and model.autocast_dtype is None and [m.seed for m in model.net._dropouts] == seeds
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert next(model.parameters()).is_contiguous()  # not converted to channels_last
    assert record["batch"] == 4 and record["step"] == 3
    assert record["gflop_per_image"] == pytest.approx(sum(record["by_op"].values()))
    assert {"aten.convolution", "aten.convolution_backward"} <= set(record["by_op"])
    for options in ({"batch": 1}, {"batch": 8}, {"bf16": False}):
        assert training_flops(model, loss, data, **{"bf16": True, "channels_last": True, **options})[
            "gflop_per_image"] == pytest.approx(record["gflop_per_image"], rel=1e-9)
    # the memory format picks the attention kernel: the fused one recomputes the attention scores in its backward
    assert training_flops(model, loss, data)["gflop_per_image"] == pytest.approx(record["gflop_per_image"], rel=0.05)


# --------------------------------------------------------------------------------------------- CLI

def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command", [[], ["bcm"], ["ct"], ["edm"]])
def test_help_shows_examples(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output and "restore-train" in result.output
    if command:
        assert "--steps" in result.output and "[default: 128" in result.output


@pytest.mark.parametrize("command, wrapper", [("bcm", BCM), ("ct", ConsistencyModel), ("edm", EDMDenoiser)])
def test_cli_trains_and_writes_a_loadable_checkpoint(tmp_path, npz, command, wrapper):
    out = tmp_path / "run"
    result = invoke(command, "--data", npz, "--out", out, "--preset", "cifar-tiny", "--steps", 2, "--batch", 4,
                    "--no-progress", "--log-every", 1)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["finished"]
    model = load_model(out / "ema.safetensors")
    assert type(model) is wrapper and model.net.config.img_resolution == 16
    assert (out / "checkpoints" / "ema-00000002.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["cli"]["command"] == command and config["train"]["batch"] == 4
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_cli_resumes_and_reports_user_errors(tmp_path, npz):
    out = tmp_path / "run"
    common = ["--preset", "cifar-tiny", "--batch", 4, "--no-progress", "--log-every", 1, "--ckpt-every", 2]
    assert invoke("bcm", "--data", npz, "--out", out, "--steps", 3, *common).exit_code == 0
    # Same directory, only --steps given: the stored options are reused and training continues at step 3.
    result = invoke("bcm", "--out", out, "--steps", 5)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    result = invoke("bcm", "--resume", out, "--steps", 6, "--chunk", 1)
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 6
    assert json.loads((out / "config.json").read_text())["loss"]["total_steps"] == 3  # curriculum K kept

    for args, message in [
        (["bcm", "--out", out, "--lr", 1e-3, "--steps", 7], "train.lr"),
        (["ct", "--out", out], "is a 'bcm' run"),
        (["bcm", "--data", tmp_path / "missing.npz", "--out", tmp_path / "x"], "unknown dataset"),
        (["bcm", "--data", npz], "missing --out"),
        (["edm", "--data", npz, "--out", tmp_path / "y", "--preset", "nope"], "unknown UNet preset"),
    ]:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_named_dataset_resolves_through_environment(tmp_path, npz, monkeypatch):
    shutil.copy(npz, tmp_path / "cifar10_train.npz")
    monkeypatch.setenv("BCM_RESTORE_DATA", str(tmp_path))
    result = invoke("edm", "--data", "cifar10", "--out", tmp_path / "run", "--preset", "cifar-tiny", "--images", 5,
                    "--batch", 2, "--limit-images", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["num_images"] == 4 and config["train"]["steps"] == 3  # ceil(5 / 2)


def test_cli_finetunes_a_bcm_from_a_consistency_model(tmp_path, npz):
    """BCF: --init with a CM checkpoint builds the identity-initialised BCM and fixes N at 320 intervals."""
    common = ["--data", npz, "--preset", "cifar-tiny", "--steps", 1, "--batch", 2, "--no-progress"]
    assert invoke("ct", "--out", tmp_path / "ct", *common).exit_code == 0
    result = invoke("bcm", "--out", tmp_path / "bcf", "--init", tmp_path / "ct" / "ema.safetensors", *common)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "bcf" / "config.json").read_text())
    assert config["loss"]["fixed_scales"] == 320 and config["model"]["net"]["bidirectional"]
    assert json.loads((tmp_path / "bcf" / "log.jsonl").read_text().splitlines()[-1])["num_points"] == 321
    result = CliRunner().invoke(main, ["edm", "--out", str(tmp_path / "e"), "--init",
                                       str(tmp_path / "ct" / "ema.safetensors"), *map(str, common)])
    assert result.exit_code != 0 and "needs EDMDenoiser" in result.output


DDP_SCRIPT = """
import json, os, sys, torch
from restore.engine.wrappers import BCM
from restore.engine.networks.unet import UNet, UNetConfig
from training.loop import TrainConfig, train
from training.losses import BCTLoss
torch.manual_seed(0)
net = UNet(UNetConfig.preset("cifar-tiny", img_resolution=8, attention_resolutions=(), bidirectional=True, dropout=0.1))
model = BCM(net)
train(model, BCTLoss(total_steps=3), torch.rand(32, 3, 8, 8) * 2 - 1, TrainConfig(steps=3, batch=8, lr=1e-3),
      sys.argv[1], progress=False)
with open(os.path.join(sys.argv[1], "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump([p.double().sum().item() for p in model.parameters()], f)
"""


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, npz):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training", "edm", "--data", str(npz),
           "--out", str(out), "--preset", "cifar-tiny", "--steps", "2", "--batch", "4", "--no-progress",
           "--log-every", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["images"] for r in log] == [4, 8]
    assert isinstance(load_model(out / "ema.safetensors"), EDMDenoiser)

    # BCT with dropout under DDP: the two ranks see different data but end with identical weights.
    script = tmp_path / "ddp_bct.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "bct")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = [json.loads((tmp_path / "bct" / f"rank{r}.json").read_text()) for r in range(2)]
    assert sums[0] == sums[1]


# --------------------------------------------------------------------------------------------- BCT vs exact flow

class MLPNet(nn.Module):
    """A small per-image MLP standing in for the UNet on 4-pixel images (smooth log-sigma features)."""

    def __init__(self, dim: int = 4, hidden: int = 128):
        super().__init__()
        self.freqs = nn.Parameter(torch.arange(1, 9, dtype=torch.float32), requires_grad=False)
        self.body = nn.Sequential(nn.Linear(dim + 32, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, dim))

    def _features(self, label):
        a = (label / 1000)[:, None] * self.freqs  # label = 250 ln sigma
        return torch.cat([a.cos(), a.sin()], 1)

    def forward(self, x, noise_t, noise_u=None, class_labels=None, cond=None):
        h = torch.cat([x.flatten(1), self._features(noise_t), self._features(noise_u)], 1)
        return self.body(h).view_as(x)


def flow_errors(model, flow: GaussianFlow, shape, pairs, n: int = 2000, seed: int = 1) -> dict:
    """Relative error ||f(x_t, t, u) - flow(x_t, t, u)|| / ||flow(x_t, t, u) - mu|| with x_t from the exact marginal."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for t, u in pairs:
            x_t = flow.sample((n, *shape), t, generator=g)
            ref = flow.flow(x_t, t, u)
            out[(t, u)] = ((model.jump(x_t, t, u) - ref).norm() / (ref - flow.mu).norm()).item()
    return out


PAIRS = [(80.0, 0.002), (1.0, 0.002), (0.07, 0.5), (0.07, 2.0), (5.0, 0.5), (0.07, 80.0)]


def _train_gaussian(steps: int, **loss_options) -> dict:
    """BCT(-style) training of an MLP BCM on N(-0.4, 0.25^2) 2x2 images; relative errors at PAIRS, plus
    "recon": one-step inversion 0.07 -> 80 then one-step generation, vs the exact flow 0.07 -> sigma_min."""
    torch.manual_seed(0)
    flow, shape = GaussianFlow(mu=-0.4, s=0.25), (1, 2, 2)
    model = BCM(MLPNet())
    loss = BCTLoss(total_steps=steps, **loss_options)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = flow.sample((128, *shape), 0.0, generator=g)
        opt.zero_grad()
        loss(model, x, step=step, generator=g).mean().backward()
        opt.step()
    errors = flow_errors(model, flow, shape, PAIRS)
    with torch.no_grad():
        x = flow.sample((2000, *shape), 0.07, generator=torch.Generator().manual_seed(2))
        ref = flow.flow(x, 0.07, 0.002)
        recon = model.jump(model.jump(x, 0.07, 80.0), 80.0, 0.002)
        errors["recon"] = ((recon - ref).norm() / (ref - flow.mu).norm()).item()
    return errors


def test_bct_learns_the_gaussian_flow_map_in_both_directions():
    """600 steps (N fixed at 20 intervals): denoising and moderate up/down jumps approach the closed form
    (untrained: 1.36 / 0.50 / 0.83 / 0.67); without the bidirectional term the jumps away from sigma_min are
    not learnt."""
    bct = _train_gaussian(600, fixed_scales=20)
    ct = _train_gaussian(600, fixed_scales=20, bidirectional=False)
    print("BCT", bct, "\nCT ", ct)
    assert bct[(1.0, 0.002)] < 0.45
    assert bct[(0.07, 0.5)] < 0.35 and bct[(0.07, 0.5)] < 0.7 * ct[(0.07, 0.5)]
    assert bct[(0.07, 2.0)] < 0.7 and bct[(0.07, 2.0)] < 0.85 * ct[(0.07, 2.0)]
    assert bct[(5.0, 0.5)] < 0.2 and bct[(5.0, 0.5)] < 0.5 * ct[(5.0, 0.5)]


@pytest.mark.slow
def test_bct_long_run_approaches_the_gaussian_flow_map():
    """5000 steps with the default curriculum (about 1-2 min on 1 CPU thread)."""
    bct = _train_gaussian(5000)
    print("BCT", bct)
    assert bct[(80.0, 0.002)] < 0.55 and bct[(1.0, 0.002)] < 0.25
    assert bct[(0.07, 0.5)] < 0.25 and bct[(0.07, 2.0)] < 0.4 and bct[(5.0, 0.5)] < 0.35


@pytest.mark.slow
def test_compiled_network_trains_like_eager(tmp_path):
    """--compile (network only) gives the eager loss curve, dropout masks included (1-2 min of compilation on CPU)."""
    data = images(16)
    curves = []
    for compile_net in (False, True):
        model = BCM(tiny_net(True, dropout=0.1))
        train(model, BCTLoss(total_steps=4), data, TrainConfig(steps=4, batch=4, lr=1e-3, compile=compile_net,
                                                              log_every=1), tmp_path / str(compile_net), progress=False)
        curves.append([json.loads(line)["loss"] for line in (tmp_path / str(compile_net) / "log.jsonl").open()])
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)


def test_export_card_recipe_reproduces_the_run(tmp_path, npz):
    """The card's recipe is the single source of truth: running it again gives the same weights, bit for bit."""
    out = tmp_path / "run"
    # stopped early (as a --time-limit stop does): the recipe keeps --steps 5 (the curriculum) and adds --chunk 3
    assert invoke("bcm", "--data", npz, "--out", out, "--preset", "cifar-tiny", "--steps", 5, "--batch", 4,
                  "--no-progress", "--log-every", 2, "--no-xflip", "--chunk", 3).exit_code == 0
    (tmp_path / "metrics.json").write_text(json.dumps({"fid": {"1": 123.4}}))
    result = invoke("export", out, tmp_path / "bcm.safetensors", "--fp32", "--metrics", tmp_path / "metrics.json")
    assert result.exit_code == 0, result.output
    card = read_metadata(tmp_path / "bcm.safetensors")["card"]
    assert card["budget"]["steps"] == 3 and card["budget"]["images"] == 12 and card["budget"]["train_seconds"] > 0
    compute = json.loads((out / "config.json").read_text())["compute"]
    assert card["budget"]["gflop_per_image"] == pytest.approx(compute["gflop_per_image"], rel=1e-5)
    assert card["budget"]["train_gflop"] == pytest.approx(12 * compute["gflop_per_image"], rel=1e-5)
    assert card["metrics"] == {"fid": {"1": 123.4}}
    words = shlex.split(card["recipe"])
    assert words[:2] == ["restore-train", "bcm"] and "--time-limit" not in words and "--no-xflip" in words
    assert words[words.index("--chunk") + 1] == "3" and words[words.index("--steps") + 1] == "5"
    again = tmp_path / "again"
    assert invoke(*words[1:-2], "--out", again, "--no-progress").exit_code == 0
    exported, rerun = load_model(tmp_path / "bcm.safetensors"), load_model(again / "ema.safetensors")
    for key, value in exported.net.state_dict().items():
        assert torch.equal(value, rerun.net.state_dict()[key]), key
    assert invoke("export", tmp_path, tmp_path / "x.safetensors").exit_code == 1  # not a run: one-line error
