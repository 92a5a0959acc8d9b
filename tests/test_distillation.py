"""Bidirectional consistency distillation (BCD): training.losses.BCDLoss, training.finetune.bcm_from_edm and
`restore-train bcm --teacher` (docs/methods.md#bidirectional-consistency-distillation).

Oracles: the closed-form Gaussian flow (restore.engine.oracles: exact EDM denoiser as the teacher, exact flow map as
the reference and as a perfect student), the Euler step of the teacher's PF ODE for the student at initialisation,
and an uninterrupted run for exact resume.
"""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from restore.engine.checkpoints import load_model, read_metadata
from restore.engine.networks.unet import UNet, UNetConfig
from restore.engine.oracles import GaussianFlow, oracle_bcm, oracle_edm
from restore.engine.sampling import pf_ode_step
from restore.engine.wrappers import BCM, ConsistencyModel, EDMDenoiser
from training.cli import main
from training.finetune import bcm_from_edm
from training.losses import BCDLoss, BCTLoss

pytestmark = pytest.mark.usefixtures("single_thread")

MU, S = 0.3, 0.5  # Gaussian data N(MU, S^2) per pixel
SIGMA_MIN = 0.002


def tiny_edm(res: int = 8) -> EDMDenoiser:
    """A cifar-tiny EDM denoiser with a random (not zero) output layer, so that F really depends on x and t."""
    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("cifar-tiny", img_resolution=res, attention_resolutions=()))
    with torch.no_grad():
        for p in net.out.parameters():
            p.normal_(0, 0.05)
    return EDMDenoiser(net)


# --------------------------------------------------------------------------------------------- initialisation

@pytest.mark.parametrize("t, u", [(80.0, SIGMA_MIN), (3.0, SIGMA_MIN), (0.5, SIGMA_MIN), (2.0, 0.7), (0.07, 80.0),
                                  (1.0, 5.0)])
def test_student_starts_as_one_euler_step_of_the_teacher(t, u):
    """bcm_from_edm: same F, identity u-path, so f(x, t, u) = x + (u - t)(x - D(x; t))/t in both directions; the
    one-step x0 prediction is f(x, t, sigma_min) = D(x; t) + (sigma_min/t)(x - D(x; t)) (training/finetune.py)."""
    teacher = tiny_edm()
    student = bcm_from_edm(teacher)
    assert not teacher.net.config.bidirectional and student.net.config.bidirectional
    assert (student.sigma_min, student.sigma_max, student.sigma_data) == (0.002, 80.0, 0.5)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * (t**2 + 0.25) ** 0.5
    with torch.no_grad():
        denoised = teacher(x, t)
        jump = student.jump(x, t, u)
        euler = x + (u - t) * (x - denoised) / t
        assert (jump - euler).abs().max() <= 1e-5 * (x.abs().max() + euler.abs().max())  # float32 rounding
        # the u branch contributes nothing: the raw network output is the teacher's, whatever u
        label_t = torch.full((4,), 250 * torch.log(torch.tensor(t)).item())
        for other_u in (SIGMA_MIN, 1.0, 80.0):
            label_u = torch.full((4,), 250 * torch.log(torch.tensor(other_u)).item())
            assert torch.allclose(student.net(x, label_t, label_u), teacher.net(x, label_t), atol=1e-6)
        if u == SIGMA_MIN:
            gap = student(x, t) - denoised  # = sigma_min * eps_hat, not 0
            assert torch.allclose(gap, (SIGMA_MIN / t) * (x - denoised), atol=2e-6)
            assert gap.abs().max() > 0


def test_bcm_from_edm_needs_an_edm_teacher():
    torch.manual_seed(0)
    cm = ConsistencyModel(UNet(UNetConfig.preset("cifar-tiny", img_resolution=8, attention_resolutions=())))
    with pytest.raises(ValueError, match="EDM denoiser"):
        bcm_from_edm(cm)
    with pytest.raises(ValueError, match="already bidirectional"):
        bcm_from_edm(EDMDenoiser(bcm_from_edm(tiny_edm()).net))


# --------------------------------------------------------------------------------------------- the pair

def test_pair_is_one_heun_step_of_the_teacher_and_the_rest_is_bct():
    """Same draws as BCT (t, z, u); x_t identical; x_t' = Heun step of the teacher (2 forwards, no backward), close
    to the exact flow map; the student's passes are BCT's."""
    flow, teacher = GaussianFlow(MU, S), oracle_edm(MU, S)
    x = flow.sample((64, 1, 4, 4), 0.0, generator=torch.Generator().manual_seed(0))
    student = BCM(MLP())
    bct, bcd = BCTLoss(fixed_scales=20), BCDLoss(teacher=teacher, fixed_scales=20)
    pairs = {}
    for name, loss in (("bct", bct), ("bcd", bcd)):
        original = loss.adjacent_pair

        def spy(model, x, z, t, t_prev, _name=name, _original=original, **cond):
            pairs[_name] = (t, t_prev, *_original(model, x, z, t, t_prev, **cond))
            return pairs[_name][2:]

        object.__setattr__(loss, "adjacent_pair", spy)
        student.counter.reset()
        with teacher.counter.counting() as teacher_calls:
            terms = loss.terms(student, x, step=0, generator=torch.Generator().manual_seed(3))
            sum(terms.values()).mean().backward()
        assert set(terms) == ({"ct", "bct"} if name == "bct" else {"cd", "bcd"})
        assert student.counter.forward == 4  # online, target, jump, back
        assert (teacher_calls.forward, teacher_calls.backward) == ((0, 0) if name == "bct" else (2, 0))
    t, t_prev, x_t, x_prev = pairs["bcd"]
    assert torch.equal(t, pairs["bct"][0]) and torch.equal(x_t, pairs["bct"][2])
    assert not x_prev.requires_grad
    assert torch.equal(x_prev, pf_ode_step(teacher, x_t, t, t_prev)[0])
    exact = flow.flow(x_t, t[:, None, None, None], t_prev[:, None, None, None])
    step = (exact - x_t).flatten(1).norm(dim=1)
    ratio = ((x_prev - exact).flatten(1).norm(dim=1) / step).max().item()
    print("Heun error / step", ratio)
    assert ratio < 0.05  # second order: a few per cent of the step with N = 20 intervals
    assert BCDLoss(teacher=teacher).to_dict()["teacher_name"] is None and "teacher" not in bcd.to_dict()


@pytest.mark.parametrize("fixed_scales", [20, 80])
def test_exact_flow_map_is_a_fixed_point_of_bcd_not_of_bct(fixed_scales):
    """The perfect student (the exact flow map, oracle_bcm) has BCD loss ~ 0 (the Heun error only, shrinking with N)
    while BCT's noisy pair keeps its loss high: BCD's targets are the teacher's trajectory, not a sample."""
    flow = GaussianFlow(MU, S)
    x = flow.sample((256, 1, 4, 4), 0.0, generator=torch.Generator().manual_seed(0))
    values = {}
    for loss in (BCTLoss(fixed_scales=fixed_scales), BCDLoss(teacher=oracle_edm(MU, S), fixed_scales=fixed_scales)):
        terms = loss.terms(oracle_bcm(MU, S), x, step=0, generator=torch.Generator().manual_seed(1))
        values[type(loss).__name__] = sum(terms.values()).mean().item()
    print(fixed_scales, values)
    assert values["BCTLoss"] > 0.3
    assert values["BCDLoss"] < (0.02 if fixed_scales == 20 else 1e-4) * values["BCTLoss"]


# --------------------------------------------------------------------------------------------- BCT vs BCD, trained

class MLP(nn.Module):
    """A per-pixel MLP F(x_pixel, features(250 ln t), features(250 ln u)): the Gaussian flow map acts per pixel."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.freqs = nn.Parameter(torch.arange(1, 9, dtype=torch.float32), requires_grad=False)
        self.body = nn.Sequential(nn.Linear(1 + 32, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, 1))

    def _features(self, label: torch.Tensor) -> torch.Tensor:
        a = (label / 1000)[:, None] * self.freqs
        return torch.cat([a.cos(), a.sin()], 1)

    def forward(self, x, noise_t, noise_u=None, class_labels=None, cond=None):
        b, d = x.shape[0], x[0].numel()
        feat = torch.cat([self._features(noise_t), self._features(noise_u)], 1)
        h = torch.cat([x.reshape(b, d, 1), feat[:, None, :].expand(b, d, feat.shape[1])], 2)
        return self.body(h).view_as(x)


GENERATION, INVERSION, MIDDLE = (80.0, SIGMA_MIN), (0.07, 80.0), (3.0, SIGMA_MIN)
STEPS = 400


def _flow_error(model, flow: GaussianFlow, t: float, u: float, n: int = 2000) -> float:
    """||f(x_t, t, u) - flow(x_t, t, u)|| / ||flow(x_t, t, u) - mu|| over x_t from the exact marginal at t."""
    x_t = flow.sample((n, 1, 4, 4), t, generator=torch.Generator().manual_seed(1))
    ref = flow.flow(x_t, t, u)
    with torch.no_grad():
        return ((model.jump(x_t, t, u) - ref).norm() / (ref - flow.mu).norm()).item()


@pytest.fixture(scope="module")
def trained() -> dict[str, dict]:
    """BCT and BCD, same seed, same network and initialisation, same data stream, STEPS Adam steps (about 2 s each):
    relative one-jump errors against the exact flow map."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flow = GaussianFlow(MU, S)
    errors = {}
    try:
        for name in ("bct", "bcd"):
            options = dict(total_steps=STEPS, fixed_scales=20)
            loss = BCTLoss(**options) if name == "bct" else BCDLoss(teacher=oracle_edm(MU, S), **options)
            torch.manual_seed(0)
            model = BCM(MLP())
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            g = torch.Generator().manual_seed(0)
            for step in range(STEPS):
                x = flow.sample((64, 1, 4, 4), 0.0, generator=g)
                opt.zero_grad()
                loss(model, x, step=step, generator=g).mean().backward()
                opt.step()
            errors[name] = {pair: _flow_error(model, flow, *pair) for pair in (GENERATION, INVERSION, MIDDLE)}
    finally:
        torch.set_num_threads(threads)
    print("\none-jump relative error vs the exact flow map (BCT / BCD):",
          {f"{t}->{u}": f"{errors['bct'][(t, u)]:.3f} / {errors['bcd'][(t, u)]:.3f}" for t, u in errors["bct"]})
    return errors


def test_bcd_learns_the_flow_map_faster_where_the_pairs_are_drawn(trained):
    """Where the lognormal pair sampling puts its mass (t ~ 0.1-10), the teacher's pair makes the student several times
    more accurate than BCT's after the same steps (measured: 3 -> sigma_min 0.33 vs 0.14)."""
    bct, bcd = trained["bct"], trained["bcd"]
    assert bcd[MIDDLE] < 0.6 * bct[MIDDLE] and bcd[MIDDLE] < 0.25


@pytest.mark.xfail(strict=True, reason="not at this budget: the far ends (t or u = sigma_max, outside the pairs' "
                                       "range t <= t_{N-2}) stay about as poor for BCD as for BCT after a few hundred "
                                       "steps (measured 80 -> 0.002: 0.90 BCT / 0.82 BCD; 0.07 -> 80: 0.63 / 0.84); "
                                       "docs/methods.md#bidirectional-consistency-distillation")
def test_bcd_beats_bct_at_generation_and_inversion_jumps(trained):
    bct, bcd = trained["bct"], trained["bcd"]
    assert bcd[GENERATION] < 0.8 * bct[GENERATION] and bcd[INVERSION] < 0.8 * bct[INVERSION]


# --------------------------------------------------------------------------------------------- CLI

def invoke(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _teacher(tmp_path, npz, name: str = "edm", seed: int = 0):
    invoke("edm", "--data", npz, "--out", tmp_path / name, "--preset", "cifar-tiny", "--steps", 1, "--batch", 2,
           "--seed", seed, "--no-progress")
    return tmp_path / name / "ema.safetensors"


def test_cli_distils_from_a_teacher_resumes_bit_exactly_and_records_it(tmp_path, npz):
    """A smoke run of `restore-train bcm --teacher`: 4 steps at once == 2 + 2 (weights, EMA, losses), the student's
    first loss is the teacher-initialised one, and the teacher is in config.json and in the card's recipe."""
    teacher = _teacher(tmp_path, npz)
    common = ["--teacher", teacher, "--data", npz, "--steps", 4, "--batch", 4, "--no-progress", "--log-every", 1,
              "--ckpt-every", 2]
    invoke("bcm", "--out", tmp_path / "full", *common)
    invoke("bcm", "--out", tmp_path / "part", *common, "--chunk", 2)
    invoke("bcm", "--out", tmp_path / "part")  # stored options: same teacher, continues at step 2
    runs = {p: load_model(tmp_path / p / "ema.safetensors") for p in ("full", "part")}
    for (key, a), b in zip(runs["full"].state_dict().items(), runs["part"].state_dict().values()):
        assert torch.equal(a, b), key
    logs = {p: [json.loads(line) for line in (tmp_path / p / "log.jsonl").read_text().splitlines()]
            for p in ("full", "part")}
    assert [r["loss"] for r in logs["full"]] == [r["loss"] for r in logs["part"]]
    assert set(logs["full"][0]) >= {"cd", "bcd"}

    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["loss"]["name"] == "BCDLoss" and config["loss"]["teacher_name"] == str(teacher)
    assert len(config["loss"]["teacher_sha256"]) == 64 and config["model"]["net"]["bidirectional"]
    assert config["cli"]["options"]["preset"] == "cifar-tiny"  # the teacher's network, not the default preset
    assert config["loss"]["fixed_scales"] is None  # the BCT curriculum (only --init fixes N)

    invoke("export", tmp_path / "full", tmp_path / "bcd.safetensors")
    words = shlex.split(read_metadata(tmp_path / "bcd.safetensors")["card"]["recipe"])
    assert words[words.index("--teacher") + 1] == str(teacher) and "--preset" in words

    # A different teacher behind the same run is refused; so are a teacher of another kind and a wrong preset.
    other = _teacher(tmp_path, npz, "edm2", seed=1)
    result = invoke("bcm", "--out", tmp_path / "full", "--teacher", other, "--steps", 5, ok=False)
    assert result.exit_code != 0 and "loss.teacher" in result.output
    result = invoke("bcm", "--out", tmp_path / "x", "--teacher", tmp_path / "full" / "ema.safetensors", "--data", npz,
                    ok=False)
    assert result.exit_code != 0 and "EDMDenoiser" in result.output
    result = invoke("bcm", "--out", tmp_path / "y", "--teacher", teacher, "--data", npz, "--preset", "cifar-small",
                    ok=False)
    assert result.exit_code != 0 and "not the network of --teacher" in result.output
    assert "Traceback" not in result.output


def test_cli_student_starts_from_the_teacher(tmp_path, npz):
    """With --teacher (no --init) the student's network is the teacher's plus the identity u-path."""
    teacher_path = _teacher(tmp_path, npz)
    invoke("bcm", "--out", tmp_path / "run", "--teacher", teacher_path, "--data", npz, "--steps", 1, "--batch", 2,
           "--lr", 1e-30, "--ema", 0.0, "--no-progress")
    student, teacher = load_model(tmp_path / "run" / "ema.safetensors"), load_model(teacher_path)
    for key, value in teacher.net.state_dict().items():
        assert torch.allclose(student.net.state_dict()[key], value, atol=1e-20), key
    dim = student.net.time_embed_align.weight.shape[0]
    assert torch.allclose(student.net.time_embed_align.weight, torch.cat([torch.eye(dim), torch.zeros(dim, dim)], 1),
                          atol=1e-20)
