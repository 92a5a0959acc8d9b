"""ADM-family converters (openai-cm, guided-diffusion, i2sb) and the VP-epsilon wrapper.

Files are written here in the official layouts (seeded random values, scaled-down configs with the official
structure); the full official layouts (shared/reference/checkpoints/*_layouts.json, key -> shape of the real files)
are checked on the meta device. Outputs of the converted checkpoints are compared with `ref_adm`, an independent
functional reading of the official ``UNetModel`` equations on the *official* state dict (Conv1d attention, legacy or
new qkv split, scale-shift norm, learned-variance head).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from restore.engine.checkpoints import load_model, read_metadata
from restore.engine.convert import convert_checkpoint
from restore.engine.convert import guided_diffusion as gd_module
from restore.engine.convert import i2sb as i2sb_module
from restore.engine.convert import openai_cm as cm_module
from restore.engine.convert.i2sb import read_options
from restore.engine.networks import UNet, UNetConfig, count_parameters
from restore.engine.wrappers import ConsistencyModel, EDMDenoiser, VPEpsDenoiser, serves, vp_schedule_sigmas

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "checkpoints"


def _layouts() -> dict[str, dict]:
    out = {}
    for name in ("adm_layouts.json", "cm_layouts.json"):
        if (REFERENCE / name).is_file():
            out.update(json.loads((REFERENCE / name).read_text()))
    return out


LAYOUTS = _layouts()
needs_layouts = pytest.mark.skipif(not LAYOUTS, reason="reference layouts not available")

# ---------------------------------------------------------------------------------------------------------------
# Official configurations (guided-diffusion `create_model` arguments) and an official-layout state dict generator.


def official_mult(image_size: int) -> tuple[int, ...]:
    """guided-diffusion / consistency_models `create_model` default channel_mult by image size."""
    return {64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}[image_size]


def config_from_args(args: dict, *, classes: int = 1000, **overrides) -> UNetConfig:
    """The native `UNetConfig` of an official ``create_model(**args)`` (attention strings are resolutions)."""
    fields = dict(
        img_resolution=args["image_size"], model_channels=args["num_channels"],
        channel_mult=official_mult(args["image_size"]), num_res_blocks=args["num_res_blocks"],
        attention_resolutions=tuple(int(r) for r in args["attention_resolutions"].split(",")),
        num_head_channels=args["num_head_channels"], num_classes=classes if args["class_cond"] else 0,
        resblock_updown=args["resblock_updown"], scale_shift_norm=args["use_scale_shift_norm"], qkv_norm=False,
    )
    fields.update(overrides)
    return UNetConfig(**fields)


def official_shapes(config: UNetConfig, *, conv1d: bool, out_rows: int = 3, prefix: str = "") -> dict[str, tuple]:
    """Key -> shape of the official file for ``config``: Conv1d attention weights for guided-diffusion / I2SB and
    ``out_rows`` output channels (6: learned variance)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    for k, s in shapes.items():
        if conv1d and k.endswith((".qkv.weight", ".proj_out.weight")):
            shapes[k] = s[:-1]
        if k in ("out.2.weight", "out.2.bias"):
            shapes[k] = (out_rows, *s[1:])
    return {prefix + k: s for k, s in shapes.items()}


_NORMS = ("in_layers.0.weight", "out_layers.0.weight", "norm.weight", "out.0.weight")


def random_state_dict(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded values for every entry (zero-initialised convs included), GroupNorm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.1
        sd[k] = t + 1.0 if k.endswith(_NORMS) else t
    return sd


# ---------------------------------------------------------------------------------------------------------------
# Independent reference: the official UNetModel forward, written from guided-diffusion's equations.


def ref_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ref_adm(sd: dict[str, torch.Tensor], args: dict, x: torch.Tensor, t: torch.Tensor, y=None, *,
            legacy: bool, mult: tuple[int, ...], cond: torch.Tensor | None = None) -> torch.Tensor:
    """guided-diffusion ``UNetModel.forward`` in float64 on an official state dict (any output rows)."""
    sd = {k: v.double() for k, v in sd.items()}
    silu = F.silu

    def lin(h, p):
        return F.linear(h, sd[p + ".weight"], sd[p + ".bias"])

    def gn(h, p):
        return F.group_norm(h, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)

    def conv(h, p):
        return F.conv2d(h, sd[p + ".weight"], sd[p + ".bias"], padding=sd[p + ".weight"].shape[-1] // 2)

    emb = lin(silu(lin(ref_timestep_embedding(t, args["num_channels"]), "time_embed.0")), "time_embed.2")
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]

    def resblock(h, p, resample=None):
        def rs(v):
            if resample == "down":
                return F.avg_pool2d(v, 2)
            return F.interpolate(v, scale_factor=2, mode="nearest") if resample == "up" else v

        hh = conv(rs(silu(gn(h, p + ".in_layers.0"))), p + ".in_layers.2")
        e = lin(silu(emb), p + ".emb_layers.1")[:, :, None, None]
        if args["use_scale_shift_norm"]:
            scale, shift = torch.chunk(e, 2, dim=1)
            hh = silu(gn(hh, p + ".out_layers.0") * (1 + scale) + shift)
        else:
            hh = silu(gn(hh + e, p + ".out_layers.0"))
        hh = conv(hh, p + ".out_layers.3")
        skip = rs(h)
        if p + ".skip_connection.weight" in sd:
            skip = conv(skip, p + ".skip_connection")
        return skip + hh

    def attention(h, p):
        b, c, hgt, wid = h.shape
        flat = h.reshape(b, c, -1)
        w_qkv, w_out = sd[p + ".qkv.weight"], sd[p + ".proj_out.weight"]
        w_qkv, w_out = w_qkv.reshape(*w_qkv.shape[:2], 1), w_out.reshape(*w_out.shape[:2], 1)  # Conv1d either way
        qkv = F.conv1d(gn(flat, p + ".norm"), w_qkv, sd[p + ".qkv.bias"])
        heads, ch = c // args["num_head_channels"], args["num_head_channels"]
        length = qkv.shape[-1]
        if legacy:  # QKVAttentionLegacy: (heads, three, dim)
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        else:  # QKVAttention: (three, heads, dim)
            q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, length)
        return (flat + F.conv1d(a, w_out, sd[p + ".proj_out.bias"])).reshape(b, c, hgt, wid)

    attn_ds = [args["image_size"] // int(r) for r in args["attention_resolutions"].split(",")]
    nrb = args["num_res_blocks"]
    h = x.double() if cond is None else torch.cat([x, cond], 1).double()
    hs, block, ds = [], 0, 1
    h = conv(h, "input_blocks.0.0")
    hs.append(h)
    for level in range(len(mult)):
        for _ in range(nrb):
            block += 1
            h = resblock(h, f"input_blocks.{block}.0")
            if ds in attn_ds:
                h = attention(h, f"input_blocks.{block}.1")
            hs.append(h)
        if level != len(mult) - 1:
            block += 1
            h = resblock(h, f"input_blocks.{block}.0", "down")
            hs.append(h)
            ds *= 2
    h = resblock(attention(resblock(h, "middle_block.0"), "middle_block.1"), "middle_block.2")
    block = -1
    for level in reversed(range(len(mult))):
        for i in range(nrb + 1):
            block += 1
            h = resblock(torch.cat([h, hs.pop()], 1), f"output_blocks.{block}.0")
            pos = 1
            if ds in attn_ds:
                h = attention(h, f"output_blocks.{block}.1")
                pos = 2
            if level and i == nrb:
                h = resblock(h, f"output_blocks.{block}.{pos}", "up")
                ds //= 2
    return conv(silu(gn(h, "out.0")), "out.2")


# Scaled-down configs with the official structure (levels, blocks, attention levels, switches) of each family.
SMALL = {
    "cm_imagenet64": {"image_size": 64, "num_channels": 32, "num_res_blocks": 3, "attention_resolutions": "32,16,8",
                      "class_cond": True, "use_scale_shift_norm": True, "num_head_channels": 32,
                      "resblock_updown": True},
    "cm_lsun256": {"image_size": 256, "num_channels": 32, "num_res_blocks": 2, "attention_resolutions": "32,16,8",
                   "class_cond": False, "use_scale_shift_norm": False, "num_head_channels": 32,
                   "resblock_updown": True},
    "adm256_uncond": {"image_size": 256, "num_channels": 32, "num_res_blocks": 2, "attention_resolutions": "32,16,8",
                      "class_cond": False, "use_scale_shift_norm": True, "num_head_channels": 32,
                      "resblock_updown": True},
    "adm256_cond": {"image_size": 256, "num_channels": 32, "num_res_blocks": 2, "attention_resolutions": "32,16,8",
                    "class_cond": True, "use_scale_shift_norm": True, "num_head_channels": 32,
                    "resblock_updown": True},
    "adm64_cond": {"image_size": 64, "num_channels": 32, "num_res_blocks": 3, "attention_resolutions": "32,16,8",
                   "class_cond": True, "use_scale_shift_norm": True, "num_head_channels": 32,
                   "resblock_updown": True},
    "dps_ffhq256": {"image_size": 256, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "16",
                    "class_cond": False, "use_scale_shift_norm": True, "num_head_channels": 32,
                    "resblock_updown": True},
}
# Layout -> (converter, official file name giving the defaults, converter options).
FILES = {
    "cm_imagenet64": ("openai-cm", "cd_imagenet64_lpips.pt"),
    "cm_lsun256": ("openai-cm", "cd_bedroom256_lpips.pt"),
    "adm256_uncond": ("guided-diffusion", "256x256_diffusion_uncond.pt"),
    "adm256_cond": ("guided-diffusion", "256x256_diffusion.pt"),
    "adm64_cond": ("guided-diffusion", "64x64_diffusion.pt"),
    "dps_ffhq256": ("guided-diffusion", "ffhq_10m.pt"),
    "adm256_uncond_c32": ("guided-diffusion", "256x256_diffusion_uncond.pt"),
}
GD = {"conv1d": True, "out_rows": 6}
CM = {"conv1d": False, "out_rows": 3}


def _meta(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------------------------------
# Full official layouts on the meta device.


@needs_layouts
@pytest.mark.parametrize("layout", sorted(FILES))
def test_full_official_layouts_convert_on_meta(layout, monkeypatch, capsys):
    """The real files' key -> shape lists go through the converter (defaults from the file name) and load
    strictly into the inferred UNet; the inferred config is the official one."""
    entry = LAYOUTS[layout]
    shapes = {k: tuple(s) for k, s in entry["keys"].items()}
    assert sum(math.prod(s) for s in shapes.values()) == entry["num_params"]
    fmt, name = FILES[layout]
    module = cm_module if fmt == "openai-cm" else gd_module
    monkeypatch.setattr(module, "load_state_dict_file", lambda src: _meta(shapes))
    model = (module.read_openai_cm if fmt == "openai-cm" else module.read_guided_diffusion)(name)
    args = entry["args"]
    assert model.net.config == config_from_args(args)
    expected = config_from_args(args)
    assert official_shapes(expected, **(CM if fmt == "openai-cm" else GD)) == shapes  # exact key set and shapes
    dropped = 0 if fmt == "openai-cm" else 3 * (args["num_channels"] * 9 + 1)  # the variance rows of out.2
    assert count_parameters(model.net) == entry["num_params"] - dropped
    if fmt == "openai-cm":
        assert type(model) is ConsistencyModel
    else:
        assert type(model) is VPEpsDenoiser
        assert model.schedule == ("cosine" if args["image_size"] == 64 else "linear")
    with capsys.disabled():
        print(f"\n{layout}: official {entry['num_params']:,} parameters, converted {count_parameters(model.net):,}")


@needs_layouts
def test_full_i2sb_layout_on_meta(monkeypatch):
    """I2SB's network = 256x256_diffusion_uncond with 3 output rows, keys prefixed, EMA as a parameter-order list."""
    shapes = {k: tuple(s) for k, s in LAYOUTS["adm256_uncond"]["keys"].items()}
    shapes["out.2.weight"], shapes["out.2.bias"] = (3, *shapes["out.2.weight"][1:]), (3,)
    net = {"diffusion_model." + k: torch.empty(s, device="meta") for k, s in shapes.items()}
    ckpt = {"net": net, "ema": {"decay": 0.99, "num_updates": 1, "shadow_params": list(net.values()),
                                "collected_params": None}, "optimizer": None, "sched": None}
    monkeypatch.setattr(i2sb_module, "load_torch_file", lambda src: ckpt)
    model = i2sb_module.read_i2sb("latest.pt", operator="jpeg:quality=10")
    args = dict(LAYOUTS["adm256_uncond"]["args"])
    assert model.net.config == config_from_args(args)
    assert count_parameters(model.net) == LAYOUTS["adm256_uncond"]["num_params"] - 3 * (256 * 9 + 1)


# ---------------------------------------------------------------------------------------------------------------
# openai-cm


def _write_cm(tmp_path: Path, layout: str, name: str, seed: int = 0) -> tuple[Path, dict, UNetConfig]:
    args = SMALL[layout]
    config = config_from_args(args, classes=10)
    if LAYOUTS:
        full = {k: tuple(s) for k, s in LAYOUTS[layout]["keys"].items()}
        assert official_shapes(config, **CM).keys() == full.keys()  # same structure as the real file
    sd = random_state_dict(official_shapes(config, **CM), seed)
    src = tmp_path / name
    torch.save(sd, src)
    return src, sd, config


@pytest.mark.parametrize("layout,name,cls", [
    ("cm_imagenet64", "cd_imagenet64_lpips.pt", ConsistencyModel),
    ("cm_imagenet64", "edm_imagenet64_ema.pt", EDMDenoiser),
    ("cm_lsun256", "ct_bedroom256.pt", ConsistencyModel),
])
def test_openai_cm_round_trip_matches_official_equations(tmp_path, layout, name, cls):
    src, sd, config = _write_cm(tmp_path, layout, name)
    dst = convert_checkpoint(src, tmp_path / "out.safetensors", "openai-cm", num_head_channels=32)
    model = load_model(dst)
    assert type(model) is cls and model.net.config == config
    assert (model.sigma_min, model.sigma_max, model.sigma_data) == (0.002, 80.0, 0.5)
    assert read_metadata(dst)["card"] == {"source": name, "source_format": "openai-cm"}

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)  # a fully convolutional net: small inputs keep the test fast
    sigma = torch.tensor([0.5, 7.0])
    y = torch.tensor([3, 7]) if config.num_classes else None
    cond = {"class_labels": y} if y is not None else {}
    with torch.no_grad():
        out = model(x, sigma, **cond)
    sd_ = 0.5
    c_in = 1 / torch.sqrt(sigma**2 + sd_**2)
    if cls is ConsistencyModel:
        c_skip = sd_**2 / ((sigma - 0.002) ** 2 + sd_**2)
        c_out = (sigma - 0.002) * sd_ / torch.sqrt(sigma**2 + sd_**2)
    else:
        c_skip, c_out = sd_**2 / (sigma**2 + sd_**2), sigma * sd_ / torch.sqrt(sigma**2 + sd_**2)
    f = ref_adm(sd, SMALL[layout], c_in[:, None, None, None] * x, 1000 * 0.25 * torch.log(sigma.double()), y,
                legacy=False, mult=official_mult(SMALL[layout]["image_size"]))
    expected = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * f
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)


def test_openai_cm_wrapper_override_and_cm_sampling(tmp_path):
    from restore.engine.sampling import sample_cm_multistep

    src, _, _ = _write_cm(tmp_path, "cm_imagenet64", "cd_imagenet64_l2.pt")
    model = load_model(convert_checkpoint(src, tmp_path / "edm.safetensors", "openai-cm", wrapper="edm",
                                          num_head_channels=32))
    assert type(model) is EDMDenoiser and serves(model, "edm")
    with pytest.raises(ValueError, match="wrapped as cm or edm"):
        convert_checkpoint(src, tmp_path / "x.safetensors", "openai-cm", wrapper="bcm")
    cm = load_model(convert_checkpoint(src, tmp_path / "cm.safetensors", "openai-cm", num_head_channels=32))
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 80
    y = torch.tensor([1])
    with torch.no_grad():
        torch.testing.assert_close(cm.jump(x, 0.002, class_labels=y), x)  # boundary condition f(x, sigma_min) = x
        out = sample_cm_multistep(cm, x, [80.0, 10.0, 1.0], generator=torch.Generator().manual_seed(0),
                                  extra_args={"class_labels": y})
    assert out.shape == x.shape and torch.isfinite(out).all() and cm.counter.forward == 4


# ---------------------------------------------------------------------------------------------------------------
# guided-diffusion


def _write_gd(tmp_path: Path, layout: str, name: str, seed: int = 0) -> tuple[Path, dict, UNetConfig]:
    args = SMALL[layout]
    config = config_from_args(args, classes=10)
    if LAYOUTS:
        assert official_shapes(config, **GD).keys() == LAYOUTS[layout]["keys"].keys()
    sd = random_state_dict(official_shapes(config, **GD), seed)
    src = tmp_path / name
    torch.save(sd, src)
    return src, sd, config


@pytest.mark.parametrize("layout,name,schedule,legacy", [
    ("adm256_uncond", "256x256_diffusion_uncond.pt", "linear", True),
    ("adm256_cond", "256x256_diffusion.pt", "linear", True),
    ("adm64_cond", "64x64_diffusion.pt", "cosine", False),
    ("dps_ffhq256", "ffhq_10m.pt", "linear", True),
])
def test_guided_diffusion_round_trip_matches_official_equations(tmp_path, layout, name, schedule, legacy):
    src, sd, config = _write_gd(tmp_path, layout, name)
    dst = convert_checkpoint(src, tmp_path / "out.safetensors", "guided-diffusion", num_head_channels=32)
    model = load_model(dst)
    assert type(model) is VPEpsDenoiser and model.net.config == config
    assert read_metadata(dst)["wrapper_config"] == {"schedule": schedule, "steps": 1000}
    sigmas = vp_schedule_sigmas(schedule)
    assert (model.sigma_min, model.sigma_max) == (float(sigmas[0]), float(sigmas[-1]))

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 32, 32, generator=g)
    # A grid level (t = 417 exactly) and an off-grid level (t = 41.5: halfway in ln sigma between 41 and 42).
    sigma = torch.stack([sigmas[417], (sigmas[41].log() + sigmas[42].log()).div(2).exp()]).float()
    t = torch.tensor([417.0, 41.5], dtype=torch.float64)
    y = torch.tensor([3, 7]) if config.num_classes else None
    with torch.no_grad():
        out = model(x, sigma, **({"class_labels": y} if y is not None else {}))
    s = sigma.double()[:, None, None, None]
    eps = ref_adm(sd, SMALL[layout], x.double() / torch.sqrt(1 + s**2), t, y, legacy=legacy,
                  mult=official_mult(SMALL[layout]["image_size"]))
    assert eps.shape[1] == 6  # the official head: epsilon, then the variance interpolation
    expected = x.double() - s * eps[:, :3]
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4 * float(sigma.max()))
    # Network alone (no sigma amplification): the converted net reproduces the official epsilon.
    with torch.no_grad():
        net_out = model.net(x, t.float(), **({"class_labels": y} if y is not None else {}))
    ref = ref_adm(sd, SMALL[layout], x, t, y, legacy=legacy, mult=official_mult(SMALL[layout]["image_size"]))[:, :3]
    torch.testing.assert_close(net_out.double(), ref, rtol=0, atol=2e-5)


def test_guided_diffusion_options(tmp_path):
    src, sd, _ = _write_gd(tmp_path, "adm256_uncond", "model.pt")  # no size in the name: 8 * 2^(6 - 1) = 256
    model = load_model(convert_checkpoint(src, tmp_path / "a.safetensors", "guided-diffusion", num_head_channels=32,
                                          schedule="cosine"))
    assert model.net.config.img_resolution == 256 and model.schedule == "cosine"
    # The wrong qkv order loads (same shapes) but gives another function: the order is not in the weights.
    wrong = load_model(convert_checkpoint(src, tmp_path / "b.safetensors", "guided-diffusion", num_head_channels=32,
                                          qkv_order="three-heads-dim"))
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([10.0])
    with torch.no_grad():
        assert not torch.allclose(wrong.net(x, t), model.net(x, t), atol=1e-4)
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
        convert_checkpoint(src, tmp_path / "c.safetensors", "guided-diffusion", schedule="quadratic")
    with pytest.raises(ValueError, match="takes no option schedule"):
        convert_checkpoint(src, tmp_path / "c.safetensors", "openai-cm", schedule="linear")


def test_strict_key_match_and_given_config(tmp_path):
    src, sd, _ = _write_gd(tmp_path, "dps_ffhq256", "ffhq_10m.pt")
    given = load_model(convert_checkpoint(src, tmp_path / "a.safetensors", "guided-diffusion", num_head_channels=32,
                                          img_resolution=128))
    assert given.net.config.img_resolution == 128 and given.net.config.attention_resolutions == (8,)
    del sd["input_blocks.1.0.in_layers.2.bias"]  # a missing key and a stray one (a damaged or foreign file)
    sd["input_blocks.1.0.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt does not match the inferred architecture") as info:
        convert_checkpoint(tmp_path / "bad.pt", tmp_path / "b.safetensors", "guided-diffusion", num_head_channels=32)
    assert "\n" not in str(info.value)
    ckpt_src, _, net = _write_i2sb(tmp_path, None)
    ckpt = torch.load(ckpt_src, weights_only=True)
    ckpt["ema"]["shadow_params"] = ckpt["ema"]["shadow_params"][:-1]
    torch.save(ckpt, ckpt_src)
    with pytest.raises(ValueError, match="EMA parameters for"):
        convert_checkpoint(ckpt_src, tmp_path / "c.safetensors", "i2sb", operator="jpeg:quality=10")


def test_vp_schedules_match_the_reference_numbers():
    linear, cosine = vp_schedule_sigmas("linear"), vp_schedule_sigmas("cosine")
    assert (round(float(linear[0]), 4), round(float(linear[-1]), 1)) == (0.0100, 157.4)
    assert (round(float(cosine[0]), 4), round(float(cosine[-2]), 1), round(float(cosine[-1]))) == (0.0064, 641.7, 20291)
    # guided-diffusion's formulas, written out: linear betas; cosine alpha-bar with beta clipped at 0.999
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(linear, ((1 - abar) / abar).sqrt(), rtol=1e-12, atol=0)
    f = [math.cos((i / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(1001)]
    betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(1000)], dtype=torch.float64)
    assert float(betas[-1]) == 0.999
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(cosine, ((1 - abar) / abar).sqrt(), rtol=1e-12, atol=0)


class StubEps(torch.nn.Module):
    """eps(x_in, t) = 0.3 x_in + 0.001 t: known, so D can be checked against the formula."""

    def forward(self, x, noise_t, **kwargs):
        self.last_t = noise_t
        return 0.3 * x + 0.001 * noise_t.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_vp_eps_wrapper_formula(schedule):
    model = VPEpsDenoiser(StubEps(), schedule=schedule)
    sigmas = vp_schedule_sigmas(schedule)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    mid = ((sigmas[41].log() + sigmas[42].log()) / 2).exp()
    quarter = (0.75 * sigmas[700].log() + 0.25 * sigmas[701].log()).exp()
    sigma = torch.stack([sigmas[0], sigmas[999], mid, quarter])
    t = torch.tensor([0.0, 999.0, 41.5, 700.25], dtype=torch.float64)
    out = model(x, sigma)
    torch.testing.assert_close(model.net.last_t, t, rtol=0, atol=1e-9)
    s = sigma[:, None, None, None]
    torch.testing.assert_close(out, x - s * (0.3 * x / torch.sqrt(1 + s**2) + 0.001 * t[:, None, None, None]))
    # Outside the schedule's range t is clamped to its ends.
    model(x[:2], torch.tensor([1e-4, 1e5], dtype=torch.float64))
    torch.testing.assert_close(model.net.last_t, torch.tensor([0.0, 999.0], dtype=torch.float64))
    assert model.counter.forward == 2
    model.half()  # the sigma grid stays float64
    assert model.log_sigmas.dtype == torch.float64
    with pytest.raises(ValueError, match="do not match"):
        VPEpsDenoiser(StubEps(), schedule=schedule, sigma_max=80.0)


def test_vp_eps_model_serves_the_edm_methods(tmp_path):
    """The converted denoiser passes the model-kind checks of run and suites and runs an EDM-prior method."""
    from baselines.ddnm import restore_ddnm
    from operators import build_operator
    from restore.app.run import _load
    from restore.methods import get_method

    src_u, _, _ = _write_gd(tmp_path, "dps_ffhq256", "ffhq_10m.pt")
    dst = convert_checkpoint(src_u, tmp_path / "ffhq.safetensors", "guided-diffusion", num_head_channels=32)
    assert serves("vp-eps", "edm") and not serves("vp-eps", "cm") and serves("bcm", "cm")
    for name in ("dps", "pigdm", "ddrm", "ddnm", "bdia-restore"):
        net, _ = _load(str(dst), get_method(name), "cpu")
        assert type(net) is VPEpsDenoiser
    from restore.app.run import RunError

    with pytest.raises(RunError, match="needs a bcm model"):
        _load(str(dst), get_method("bcm-jpeg"), "cpu")
    model = load_model(dst)
    op = build_operator("box:size=8")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = op(x)
    with torch.no_grad():
        out = restore_ddnm(model, y, op, nfe=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all() and model.counter.forward == 3
    for name in ("dps", "pigdm", "ddrm", "bdia-restore"):  # DPS / PiGDM differentiate through the wrapper
        out = get_method(name)(model, y, op, nfe=2, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and torch.isfinite(out).all(), name


# ---------------------------------------------------------------------------------------------------------------
# I2SB


def i2sb_std_fwd(beta_max: float, n: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4**0.5, (beta_max / n) ** 0.5, n, dtype=torch.float64) ** 2
    betas = torch.cat([betas[: n // 2], betas[: n // 2].flip(0)])
    return betas.cumsum(0).sqrt()


def _write_i2sb(tmp_path: Path, options: dict | None, *, cond_x1: bool = False, seed: int = 0):
    args = SMALL["adm256_uncond"]
    config = config_from_args(args, **({"in_channels": 6} if cond_x1 else {}))
    shapes = official_shapes(config, conv1d=True, out_rows=3, prefix="diffusion_model.")
    net = random_state_dict(shapes, seed)
    ema = random_state_dict(shapes, seed + 1)  # EMA differs from the raw weights
    ckpt = {"net": net, "ema": {"decay": 0.99, "num_updates": 10, "shadow_params": list(ema.values()),
                                "collected_params": None},
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "params": list(range(len(net)))}]},
            "sched": None}
    folder = tmp_path / "results" / "jpeg-10"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, folder / "latest.pt")
    if options is not None:
        with open(folder / "options.pkl", "wb") as f:
            pickle.dump(argparse.Namespace(**options), f)
    return folder / "latest.pt", {k.removeprefix("diffusion_model."): v for k, v in ema.items()}, net


OPTIONS = {"name": "jpeg-10", "corrupt": "jpeg-10", "beta_max": 0.3, "interval": 1000, "t0": 1e-4, "T": 1.0,
           "ot_ode": False, "cond_x1": False, "add_x1_noise": False, "image_size": 256,
           "dataset_dir": pathlib.PosixPath("/dataset/imagenet"), "log_dir": pathlib.PosixPath("results/jpeg-10"),
           "ckpt_path": pathlib.PosixPath("results/jpeg-10"), "load": None, "microbatch": 2}


def test_i2sb_round_trip_matches_official_equations(tmp_path):
    src, ema, _ = _write_i2sb(tmp_path, OPTIONS)
    dst = convert_checkpoint(src, tmp_path / "i2sb.safetensors", "i2sb", num_head_channels=32)
    model = load_model(dst)
    assert model.kind == "i2sb" and model.operator == "jpeg:quality=10"  # inferred from options.corrupt
    assert read_metadata(dst)["wrapper_config"] == {"operator": "jpeg:quality=10", "beta_max": 0.3, "interval": 1000,
                                                    "ot_ode": False, "noise_label": "i2sb", "t0": 1e-4, "t_end": 1.0}
    converted = model.net.state_dict()
    assert all(torch.equal(converted[k].reshape(v.shape), v) for k, v in ema.items() if "qkv" not in k)  # the EMA
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    n = torch.tensor([0, 617])
    with torch.no_grad():
        x0 = model(x, n)
    label = 1000 * (1e-4 + n.double() * (1 - 1e-4) / 999)  # upstream noise_levels[n]
    eps = ref_adm(ema, SMALL["adm256_uncond"], x, label, legacy=True, mult=official_mult(256))
    std = i2sb_std_fwd(0.3)[n][:, None, None, None]
    torch.testing.assert_close(x0.double(), x.double() - std * eps, rtol=0, atol=1e-5)


def test_i2sb_options_and_weights(tmp_path):
    from baselines.i2sb import i2sb_sample

    options = {**OPTIONS, "corrupt": "blur-uni", "beta_max": 1.0, "ot_ode": True, "cond_x1": True}
    src, ema, net = _write_i2sb(tmp_path, options, cond_x1=True)
    with pytest.raises(ValueError, match="pass --operator.*'blur-uni'"):
        convert_checkpoint(src, tmp_path / "x.safetensors", "i2sb", num_head_channels=32)
    dst = convert_checkpoint(src, tmp_path / "x.safetensors", "i2sb", num_head_channels=32, operator="box:size=8",
                             weights="net")
    model = load_model(dst)
    assert (model.schedule.beta_max, model.ot_ode, model.cond_x1) == (1.0, True, True)
    assert model.net.config.cond_channels == 3 and model.net.config.in_channels == 3
    assert torch.equal(model.net.state_dict()["out.2.weight"], net["diffusion_model.out.2.weight"])
    x1 = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = i2sb_sample(model, x1, 2, ot_ode=True)
        eps = model.predict_eps(x1, 999, cond=x1)
    ref = ref_adm({k.removeprefix("diffusion_model."): v for k, v in net.items()}, SMALL["adm256_uncond"], x1,
                  torch.tensor([1000.0], dtype=torch.float64), legacy=True, mult=official_mult(256), cond=x1)
    torch.testing.assert_close(eps.double(), ref, rtol=0, atol=1e-4)  # float32 embedding of t = 1000
    assert out.shape == x1.shape and torch.isfinite(out).all()
    # Explicit settings override options.pkl; without options.pkl the operator's task defaults apply.
    (src.parent / "options.pkl").unlink()
    src2, _, _ = _write_i2sb(tmp_path / "b", None)
    model = load_model(convert_checkpoint(src2, tmp_path / "y.safetensors", "i2sb", num_head_channels=32,
                                          operator="box:size=8"))
    assert (model.schedule.beta_max, model.ot_ode) == (1.0, True)
    with pytest.raises(ValueError, match="pass --operator.*no options.corrupt"):
        convert_checkpoint(src2, tmp_path / "z.safetensors", "i2sb", num_head_channels=32)
    with open(tmp_path / "noisy.pkl", "wb") as f:
        pickle.dump(argparse.Namespace(**{**OPTIONS, "add_x1_noise": True}), f)
    with pytest.raises(ValueError, match="add_x1_noise is set"):
        convert_checkpoint(src2, tmp_path / "z.safetensors", "i2sb", options=tmp_path / "noisy.pkl")


def test_i2sb_default_wrapper_keeps_its_metadata():
    from baselines.i2sb import I2SB

    net = UNet(UNetConfig.preset("cifar-tiny"))
    model = I2SB(net, operator="jpeg:quality=10")
    assert model.wrapper_config() == {"operator": "jpeg:quality=10", "beta_max": 0.3, "interval": 1000,
                                      "ot_ode": False}
    with pytest.raises(ValueError, match="unknown I2SB noise_label"):
        I2SB(net, operator="jpeg:quality=10", noise_label="log4")


# ---------------------------------------------------------------------------------------------------------------
# Refusals and damaged files


class Payload:
    """Unpickling it would call pathlib.Path.touch(marker): code chosen by the file's author."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [Payload, SystemPayload])
def test_malicious_options_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    src, _, _ = _write_i2sb(tmp_path, None)
    with open(src.parent / "options.pkl", "wb") as f:
        pickle.dump(argparse.Namespace(corrupt="jpeg-10", hook=payload(marker)), f)
    with pytest.raises(ValueError) as info:
        convert_checkpoint(src, tmp_path / "out.safetensors", "i2sb", num_head_channels=32)
    message = str(info.value)
    assert "\n" not in message and message.startswith("refusing to load") and "options.pkl" in message
    assert ("pathlib.Path.touch" if payload is Payload else "system") in message
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    # the plain options round-trip
    with open(tmp_path / "ok.pkl", "wb") as f:
        pickle.dump(argparse.Namespace(**OPTIONS), f)
    assert read_options(tmp_path / "ok.pkl") == OPTIONS


@pytest.mark.parametrize("fmt", ["openai-cm", "guided-diffusion", "i2sb"])
def test_malicious_and_damaged_checkpoints(tmp_path, fmt):
    marker = tmp_path / "pwned"
    options = {"operator": "jpeg:quality=10"} if fmt == "i2sb" else {}
    torch.save({"input_blocks.0.0.weight": torch.zeros(1), "x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to load .*evil.pt") as info:
        convert_checkpoint(tmp_path / "evil.pt", tmp_path / "o.safetensors", fmt, **options)
    assert "\n" not in str(info.value) and not marker.exists()
    src = tmp_path / "good.pt"
    torch.save({"a": torch.randn(64, 64), "b": torch.randn(64)}, src)
    data = src.read_bytes()
    for name, blob in (("truncated.pt", data[: len(data) // 2]), ("corrupt.pt", b"\x80\x02garbage" * 50)):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=f"{name} is not a readable torch checkpoint") as info:
            convert_checkpoint(tmp_path / name, tmp_path / "o.safetensors", fmt, **options)
        assert "\n" not in str(info.value)


def test_damaged_options_pickle(tmp_path):
    with open(tmp_path / "options.pkl", "wb") as f:
        pickle.dump(argparse.Namespace(**OPTIONS), f)
    data = (tmp_path / "options.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pkl is not a readable options pickle") as info:
        read_options(tmp_path / "cut.pkl")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_convert_adm_families(tmp_path):
    from restore.app.cli import main

    runner = CliRunner()
    help_text = runner.invoke(main, ["convert", "--help"]).output
    for flag in ("--schedule", "--qkv-order", "--operator", "--options", "--weights", "--wrapper"):
        assert flag in help_text
    cm_src, _, _ = _write_cm(tmp_path, "cm_imagenet64", "edm_imagenet64_ema.pt")
    result = runner.invoke(main, ["convert", str(cm_src), str(tmp_path / "cm.safetensors"), "--from", "openai-cm",
                                  "--head-channels", "32", "--wrapper", "cm"])
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "cm.safetensors")["wrapper"] == "cm"
    gd_src, _, _ = _write_gd(tmp_path, "adm64_cond", "64x64_diffusion.pt")
    result = runner.invoke(main, ["convert", str(gd_src), str(tmp_path / "gd.safetensors"), "--from",
                                  "guided-diffusion", "--head-channels", "32", "--schedule", "linear"])
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "gd.safetensors")["wrapper_config"]["schedule"] == "linear"
    src, _, _ = _write_i2sb(tmp_path, OPTIONS)
    result = runner.invoke(main, ["convert", str(src), str(tmp_path / "i2sb.safetensors"), "--from", "i2sb",
                                  "--head-channels", "32", "--operator", "jpeg:quality=5",
                                  "--options", str(src.parent / "options.pkl")])
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "i2sb.safetensors")["wrapper_config"]["operator"] == "jpeg:quality=5"
    result = runner.invoke(main, ["convert", str(gd_src), str(tmp_path / "bad.safetensors"), "--from", "openai-cm",
                                  "--schedule", "cosine"])
    assert result.exit_code != 0 and "takes no option schedule" in result.output
    assert len(result.output.strip().splitlines()) == 1
