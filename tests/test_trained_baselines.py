"""Supervised conditional baselines: Palette (baselines/palette.py), I2SB (baselines/i2sb.py), their paired training
(training/paired.py, `restore-train palette|i2sb`) and checkpoints.

Oracles: upstream I2SB's schedule code (transcribed), the Brownian-bridge identities (the DDPM posterior composed
with the bridge marginal at n is the marginal at m), exact-x0 oracles for both samplers (closed-form outputs), an
uninterrupted run for exact resume.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from baselines.i2sb import I2SB, BridgeSchedule, i2sb_sample, space_indices
from baselines.palette import Palette, degraded_image, palette_sample
from operators import build_operator
from restore.engine.checkpoints import load_model, read_metadata, save_model
from restore.engine.networks.unet import UNet, UNetConfig
from restore.engine.wrappers import sigma_from_label
from restore.methods import get_method
from training.cli import main
from training.loop import TrainConfig, train
from training.paired import I2SBLoss, PaletteLoss

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_net(res: int = 8, cond: bool = False, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig.preset("cifar-tiny", img_resolution=res, attention_resolutions=(),
                                  cond_channels=3 if cond else 0))


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def images(n: int = 4, res: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------------------------- I2SB bridge

def test_schedule_matches_upstream_code():
    """Transcription of I2SB's make_beta_schedule + symmetric half + compute_gaussian_product_coef (numpy)."""
    for beta_max, n in [(0.3, 1000), (1.0, 1000), (0.3, 10)]:
        betas = np.linspace(1e-4**0.5, (beta_max / n) ** 0.5, n, dtype=np.float64) ** 2
        betas = np.concatenate([betas[: n // 2], np.flip(betas[: n // 2])])
        fwd, bwd = np.sqrt(np.cumsum(betas)), np.sqrt(np.flip(np.cumsum(np.flip(betas))))
        denom = fwd**2 + bwd**2
        s = BridgeSchedule(beta_max, n)
        for ours, theirs in [(s.betas, betas), (s.std_fwd, fwd), (s.std_bwd, bwd), (s.mu_x0, bwd**2 / denom),
                             (s.mu_x1, fwd**2 / denom), (s.std_sb, np.sqrt(fwd**2 * bwd**2 / denom))]:
            np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-12)
    assert space_indices(1000, 5) == [0, 250, 500, 749, 999] and space_indices(1000, 1000) == list(range(1000))
    assert BridgeSchedule().sample_steps(1) == [0, 999]
    with pytest.raises(ValueError, match="nfe"):
        BridgeSchedule().sample_steps(1000)
    with pytest.raises(ValueError, match="even"):
        BridgeSchedule(interval=999)


@pytest.mark.parametrize("beta_max", [0.3, 1.0])
def test_posterior_of_the_marginal_is_the_marginal(beta_max):
    """X_n ~ q(X_n | X_0, X_1), X_m ~ p(X_m | X_n, X_0)  =>  X_m ~ q(X_m | X_0, X_1) (Brownian bridge, Markov).

    Closed form for every (n, m), up to upstream's double count of beta_n in sigma_n^2 + sigma-bar_n^2 (< 1e-3),
    then the implementation by Monte Carlo."""
    s = BridgeSchedule(beta_max)
    var = s.std_fwd**2
    for n, m in [(999, 0), (999, 500), (600, 300), (700, 699), (10, 3)]:
        keep, fresh = var[m] / var[n], var[m] * (var[n] - var[m]) / var[n]
        assert abs(1 - keep - s.mu_x0[m] + keep * s.mu_x0[n]) < 1e-3
        assert abs(keep * s.mu_x1[n] - s.mu_x1[m]) < 1e-3
        assert abs((keep**2 * s.std_sb[n] ** 2 + fresh).sqrt() / s.std_sb[m] - 1) < 2e-3

    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.full((1, 1, 200, 200), -0.5), torch.full((1, 1, 200, 200), 0.8)
    n, m = 800, 300
    x_m = s.posterior(n, m, s.marginal(n, x0, x1, g), x0, g)
    mean, std = float(s.mu_x0[m] * -0.5 + s.mu_x1[m] * 0.8), float(s.std_sb[m])
    assert abs(x_m.mean().item() - mean) < 4 * std / 200
    assert abs(x_m.std().item() / std - 1) < 0.02


class X0Net(nn.Module):
    """eps-network of the exact x0 oracle for the I2SB wrapper: eps = (x - x0) / sigma_n, sigma_n from the label."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))  # keeps the wrapper's input in float64

    def forward(self, x, noise_t, noise_u=None, class_labels=None, cond=None):
        sigma = sigma_from_label(noise_t.to(torch.float64)).view(-1, 1, 1, 1)
        return ((x - self.x0) / sigma).to(x.dtype)


def test_i2sb_sampler_with_x0_oracle_is_closed_form():
    """With x0_hat = X_0 each step gives X_m - X_0 = (sigma_m^2 / sigma_n^2)(X_n - X_0) (+ noise): in OT-ODE mode the
    output is X_0 + (sigma_0^2 / sigma_{N-1}^2)(X_1 - X_0) exactly; NFE = nfe; observed pixels come from X_1."""
    x0, x1 = images(2).double(), images(2, seed=1).double()
    model = I2SB(X0Net(x0), operator="jpeg:quality=10")
    s = model.schedule
    expected = x0 + (s.std_fwd[0] ** 2 / s.std_fwd[-1] ** 2) * (x1 - x0)
    for nfe in (1, 3, 999):
        with model.counter.counting() as count:
            out = i2sb_sample(model, x1, nfe, ot_ode=True)
        assert count.forward == nfe
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    # Stochastic: the last step has no noise, so the output is X_0 + (sigma_0^2/sigma_n^2)(X_n - X_0), X_n noisy.
    out = i2sb_sample(model, x1, 4, generator=gens(0, 1))
    assert (out - x0).abs().max() < 2e-2 and not torch.allclose(out, expected, atol=1e-6)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:6, 2:6] = False
    out = i2sb_sample(model, x1, 3, mask=mask, ot_ode=True)
    assert torch.equal(out[mask.expand_as(out)], x1[mask.expand_as(x1)])
    torch.testing.assert_close(out[~mask.expand_as(out)], expected[~mask.expand_as(out)], rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------------- Palette sampler

class CondOracle:
    """Exact conditional x0 oracle for Palette's sampler: x0 is read off the condition (cond = x0 / 2)."""

    sigma_min, sigma_max = 0.002, 80.0

    def __call__(self, x, sigma, cond):
        return 2 * cond


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_palette_sampler_with_x0_oracle_returns_x0(eta):
    x0 = images(2)
    steps = []
    out = palette_sample(CondOracle(), x0 / 2, 5, eta=eta, generator=gens(0, 1), callback=steps.append)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    assert len(steps) == 5 and steps[0]["sigma"] == 80.0 and steps[-1]["sigma_next"] == 0


def test_degraded_image_is_full_size_with_noise_in_the_hole():
    x = images(2)
    for spec in ("jpeg:quality=10", "down:factor=2,kernel=bicubic", "box:size=4", "randbox:size=4"):
        op = build_operator(spec).draw(x.shape, gens(0, 1))
        y = op.measure(x, gens(0, 1))
        c = degraded_image(op, y, gens(2, 3))
        assert c.shape == x.shape
        if hasattr(op, "mask_for"):
            mask = op.mask_for(c).expand_as(c)
            assert torch.equal(c[mask], x[mask]) and c[~mask].std() > 0.5  # observed pixels kept, N(0, 1) hole
        elif op.linear:
            torch.testing.assert_close(op(c), y, atol=1e-5, rtol=0)  # A A^+ y = y
        else:
            assert torch.equal(c, y)  # JPEG: the decoded image


# --------------------------------------------------------------------------------------------- models, registry

@pytest.mark.parametrize("name", ["palette", "i2sb"])
def test_restorers_shapes_nfe_per_image_noise_and_operator_check(name):
    spec = "randbox:size=4" if name == "i2sb" else "down:factor=2,kernel=bicubic"
    model = (Palette(tiny_net(cond=True), operator=spec) if name == "palette"
             else I2SB(tiny_net(), operator=spec)).eval()
    x = images(2)
    op = build_operator(spec).draw(x.shape, gens(0, 1))
    y = op.measure(x, gens(0, 1))
    method = get_method(name)
    assert method.model == name and not method.blind
    with torch.no_grad(), model.counter.counting() as count:
        out = method(model, y, op, nfe=3, generator=gens(10, 11))
        alone = method(model, y[1:], op_one(op, 1), nfe=3, generator=gens(11))
    assert out.shape == x.shape and count.forward == 6
    torch.testing.assert_close(out[1:], alone, atol=1e-5, rtol=0)  # image 1 depends on its own generator only
    with pytest.raises(ValueError, match=f"trained for operator '{spec}'"):
        method(model, y, build_operator(spec + ",noise=0.05"), nfe=2)


def op_one(op, i):
    """The operator of image ``i`` alone (randbox: its box)."""
    return op.with_boxes(op.boxes[i:i + 1], op.image_size) if hasattr(op, "boxes") else op


def test_checkpoints_round_trip_with_operator_and_bridge(tmp_path):
    models = [Palette(tiny_net(cond=True), operator="jpeg:quality=10"),
              I2SB(tiny_net(), operator="box:size=4", interval=20)]
    for model in models:
        path = save_model(model, tmp_path / f"{model.kind}.safetensors")
        meta = read_metadata(path)
        assert meta["wrapper"] == model.kind and meta["wrapper_config"] == model.wrapper_config()
        loaded = load_model(path)
        assert type(loaded) is type(model) and loaded.wrapper_config() == model.wrapper_config()
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), k
    assert models[1].wrapper_config() == {"operator": "box:size=4", "beta_max": 1.0, "interval": 20, "ot_ode": True}
    # A fresh process finds the wrappers through the method plugins (restore never imports baselines by name).
    code = ("from restore.engine.checkpoints import load_model; import sys; "
            "print(*[load_model(p).wrapper_config()['operator'] for p in sys.argv[1:]])")
    out = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / f"{m.kind}.safetensors") for m in models)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["jpeg:quality=10", "box:size=4"]


# --------------------------------------------------------------------------------------------- training

def patterns(res: int = 8) -> torch.Tensor:
    """A trivial dataset: one smooth colour pattern and its negative."""
    ramp = torch.linspace(-0.8, 0.8, res)
    pattern = torch.stack([ramp[None, :].expand(res, res), ramp[:, None].expand(res, res), ramp.outer(ramp)])
    return torch.stack([pattern, -pattern]).repeat(8, 1, 1, 1)


@pytest.mark.parametrize("name", ["palette", "i2sb"])
def test_paired_losses_decrease(tmp_path, name):
    if name == "palette":
        spec = "down:factor=2,kernel=bicubic"
        model, loss = Palette(tiny_net(cond=True), operator=spec), PaletteLoss(spec)
    else:
        model, loss = I2SB(tiny_net(), operator="box:size=4", interval=100), I2SBLoss("box:size=4", interval=100)
    data = patterns()

    def eval_loss():
        with torch.no_grad():
            return loss(model.eval(), data, generator=torch.Generator().manual_seed(123)).mean().item()

    before = eval_loss()
    train(model, loss, data, TrainConfig(steps=30, batch=8, lr=2e-3, optimizer="adam"), tmp_path, progress=False)
    after = eval_loss()
    assert after < 0.6 * before, (before, after)
    with pytest.raises(ValueError, match="set up for"):
        type(loss)("jpeg:quality=10")(model, data[:2])


@pytest.mark.parametrize("name", ["palette", "i2sb"])
def test_training_compute_is_three_forward_passes(name):
    """One network pass and its backward per image: about 3 forward passes (the first conv needs no input
    gradient: a little under), whatever the operator that makes the pairs costs on top (a few FLOPs here)."""
    from training.data import ImageData
    from training.flops import flop_counter, training_flops

    x, t = images(4, res=16), torch.full((4,), 1.0)
    if name == "palette":
        spec = "down:factor=2,kernel=bicubic"
        model, loss = Palette(tiny_net(16, cond=True), operator=spec), PaletteLoss(spec)
        call = functools.partial(model, x, t, cond=x)
    else:
        model, loss = I2SB(tiny_net(16), operator="jpeg:quality=10"), I2SBLoss("jpeg:quality=10")
        call = functools.partial(model.predict_eps, x, torch.full((4,), 500))
    with torch.no_grad(), flop_counter() as counter:
        call()
    per_image = training_flops(model, loss, ImageData(x))
    assert per_image["gflop_per_image"] * 1e9 / (counter.get_total_flops() / 4) == pytest.approx(3, rel=0.03)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("command, spec", [("palette", "jpeg:quality=10"), ("i2sb", "randbox:size=6")])
def test_cli_trains_resumes_bit_exactly_and_stores_the_operator(tmp_path, npz, command, spec):
    common = ["--data", npz, "--preset", "cifar-tiny", "--batch", 4, "--no-progress", "--log-every", 1,
              "--ckpt-every", 2, "--lr", 1e-3, "--ema", 0.9]
    extra = ["--interval", 50] if command == "i2sb" else []
    result = invoke(command, "--operator", spec, "--out", tmp_path / "full", "--steps", 4, *common, *extra)
    assert result.exit_code == 0, result.output
    assert invoke(command, "--operator", spec, "--out", tmp_path / "part", "--steps", 4, "--chunk", 3, *common,
                  *extra).exit_code == 0
    result = invoke(command, "--out", tmp_path / "part")  # continues with the stored options
    assert result.exit_code == 0 and json.loads(result.stdout.strip().splitlines()[-1])["step"] == 4, result.output
    full, part = (load_file(tmp_path / p / "ema.safetensors") for p in ("full", "part"))
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)
    logs = [[json.loads(line)["loss"] for line in (tmp_path / p / "log.jsonl").read_text().splitlines()]
            for p in ("full", "part")]
    assert logs[0] == logs[1] and len(logs[0]) == 4
    model = load_model(tmp_path / "full" / "ema.safetensors")
    assert model.kind == command and model.operator == spec

    for args, message in [
        ([command, "--out", tmp_path / "full", "--operator", "jpeg:quality=20", "--steps", 5], "loss.operator"),
        ([command, "--data", npz, "--out", tmp_path / "x"], "missing --operator"),
        ([command, "--data", npz, "--out", tmp_path / "y", "--operator", "warp:size=3"], "unknown operator"),
    ]:
        result = invoke(*args)
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["palette", "i2sb"])
def test_help_shows_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Example" in result.output and f"restore-train {command}" in result.output
    assert "--operator" in result.output and "--ckpt-every" in result.output


# --------------------------------------------------------------------------------------------- bundled models

@pytest.mark.parametrize("family", ["palette", "i2sb"])
@pytest.mark.parametrize("tag, spec", [("jpeg10", "jpeg:quality=10"), ("box16", "box:size=16"),
                                       ("sr2", "down:factor=2,kernel=bicubic")])
def test_bundled_models_restore_through_restore_run(family, tag, spec, cifar_test_uint8, tmp_path):
    from PIL import Image

    from restore.app.cli import main as restore_cli

    for i in range(3):
        Image.fromarray(cifar_test_uint8[i]).save(tmp_path / f"{i}.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(restore_cli, ["run", str(tmp_path), str(out), "--operator", spec, "--method", family,
                                              "--model", f"{family}-cifar10-{tag}", "--nfe", "2", "--degrade",
                                              "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["restored"] == 3
    rows = (out / "manifest.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert [r.split(",")[header.index("nfe_forward")] for r in rows[1:]] == ["2"] * 3


def test_restore_run_refuses_a_conditional_model_on_another_operator(cifar_test_uint8, tmp_path):
    from PIL import Image

    from restore.app.run import RunError, run_folder

    Image.fromarray(cifar_test_uint8[0]).save(tmp_path / "0.png")
    with pytest.raises(RunError, match="trained for operator 'jpeg:quality=10', not 'jpeg:quality=20'"):
        run_folder(tmp_path, tmp_path / "out", operator="jpeg:quality=20", method="i2sb", model="i2sb-cifar10-jpeg10")
    assert not (tmp_path / "out").exists()  # refused before writing anything


@pytest.mark.parametrize("tag, spec", [("jpeg10", "jpeg:quality=10"), ("sr2", "down:factor=2,kernel=bicubic")])
def test_bundled_i2sb_beats_the_pseudo_inverse(tag, spec, cifar_test):
    """The bundled one-step I2SB improves on the JPEG-10 decode by 1.4 dB and on the SR x2 pseudo-inverse (itself
    0.9 dB above bicubic) by 1.7 dB, on these 64 images."""
    from restore.quality import psnr

    x = cifar_test[:64]
    op = build_operator(spec)
    y = op.measure(x)
    with torch.inference_mode():
        x_hat = get_method("i2sb")(load_model(f"i2sb-cifar10-{tag}"), y, op, nfe=1, generator=gens(*range(64)))
    gain = psnr(x_hat, x).mean() - psnr(op.pinv(y), x).mean()
    assert gain > 1.0, gain
