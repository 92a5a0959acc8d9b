"""ADM/BCM UNet: official key layout, conditioning, attention oracle, dropout replay, memory format."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from restore.engine.networks import UNet, UNetConfig, count_parameters
from restore.engine.networks.layers import AttentionBlock, ResBlock, SyncDropout, timestep_embedding

# key -> shape of the official BCM ImageNet-64 state dict (read off the released checkpoint; tests/data/README.md)
LAYOUT = Path(__file__).resolve().parent / "data" / "bcm_imagenet64_layout.json"
BCM_IMAGENET64_PARAMS = 279_941_571  # docs/models.md#upstream-checkpoints
U_KEYS = ("time_embed_end.", "time_embed_align.")


def tiny(**overrides) -> UNetConfig:
    """cifar-tiny at 16x16 (attention at 8x8) to keep CPU tests fast."""
    return UNetConfig.preset("cifar-tiny", img_resolution=16, attention_resolutions=(8,), **overrides)


def meta_unet(name: str, **overrides) -> UNet:
    with torch.device("meta"):
        return UNet(UNetConfig.preset(name, **overrides))


def random_unet(config: UNetConfig, seed: int = 0, scale: float = 0.05) -> UNet:
    """A UNet with all parameters random (the zero-initialised convs would otherwise hide most of the network)."""
    net = UNet(config)
    n = count_parameters(net)
    g = torch.Generator().manual_seed(seed)
    torch.nn.utils.vector_to_parameters(torch.randn(n, generator=g) * scale, net.parameters())
    return net


def inputs(config: UNetConfig, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.img_resolution, config.img_resolution, generator=g)
    kw = {"noise_t": 250 * torch.log(torch.rand(batch, generator=g) * 10 + 0.01)}
    if config.bidirectional:
        kw["noise_u"] = 250 * torch.log(torch.rand(batch, generator=g) * 10 + 0.01)
    if config.num_classes:
        kw["class_labels"] = torch.randint(config.num_classes, (batch,), generator=g)
    if config.cond_channels:
        kw["cond"] = torch.randn(batch, config.cond_channels, *x.shape[2:], generator=g)
    return x, kw


def test_imagenet64_bcm_matches_official_layout():
    net = meta_unet("imagenet64-bcm")
    assert count_parameters(net) == BCM_IMAGENET64_PARAMS
    layout = json.loads(LAYOUT.read_text())
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(shapes) == list(layout["keys"])  # same keys in the same (module registration) order
    assert shapes == layout["keys"]
    assert layout["num_params"] == BCM_IMAGENET64_PARAMS


def test_ict_preset_is_bcm_without_u_embedding():
    bcm, ict = meta_unet("imagenet64-bcm").state_dict(), meta_unet("imagenet64-ict").state_dict()
    assert set(ict) == {k for k in bcm if not k.startswith(U_KEYS)}
    assert all(ict[k].shape == bcm[k].shape for k in ict)
    u_params = sum(v.numel() for k, v in bcm.items() if k.startswith(U_KEYS))
    # docs/methods.md#bcm-parametrisation: the u MLP + align
    assert u_params == (192 * 768 + 768 + 768 * 768 + 768) + 1536 * 768


@pytest.mark.parametrize("name, low, high", [("cifar-tiny", 0.5e6, 1e6), ("cifar-small", 2e6, 6e6)])
def test_cifar_preset_sizes(name, low, high):
    assert low < count_parameters(meta_unet(name)) < high


def test_imagenet64_dropout_placement_follows_official_rule():
    """Official rule (unet_bcf.py): input levels > 1, output levels >= L - 2 and the middle block get 0.2."""
    net = meta_unet("imagenet64-bcm")
    nrb, levels = 3, 4
    expected = {}
    for i in range(1, 1 + levels * (nrb + 1) - 1):
        level = (i - 1) // (nrb + 1)
        expected[f"input_blocks.{i}"] = 0.2 if level > 1 else 0.0
    for j in range(levels * (nrb + 1)):
        level = levels - 1 - j // (nrb + 1)
        expected[f"output_blocks.{j}"] = 0.2 if level >= levels - 2 else 0.0
    expected["middle_block"] = 0.2
    found = {}
    for name, m in net.named_modules():
        if isinstance(m, SyncDropout):
            parts = name.split(".")
            block = parts[0] if parts[0] == "middle_block" else ".".join(parts[:2])
            found.setdefault(block, set()).add(m.p)
    assert found == {k: {v} for k, v in expected.items()}
    assert sorted(m.index for m in net.modules() if isinstance(m, SyncDropout)) == list(range(len(net._dropouts)))


def test_timestep_embedding_is_adm_cos_then_sin():
    t = torch.tensor([0.0, 1.5, -700.0])
    emb = timestep_embedding(t, 192)
    i = torch.arange(96)
    freqs = torch.exp(-math.log(1e4) * i / 96)
    torch.testing.assert_close(emb[:, :96], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 96:], torch.sin(t[:, None] * freqs))
    assert timestep_embedding(t, 7).shape == (3, 7)


def reference_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Official QKVAttentionLegacy(cosine=True) written out per head: qkv channels [q | k | v] x heads x d."""
    b, c, hh, ww = x.shape
    heads, d = block.num_heads, c // block.num_heads
    qkv = block.qkv(block.norm(x)).reshape(b, 3 * c, hh * ww)
    out = []
    for h in range(heads):
        q, k, v = (qkv[:, j * c + h * d: j * c + (h + 1) * d] for j in range(3))  # (B, d, S)
        if block.qkv_norm:
            q, k, v = (z / (1e-4 + z.norm(dim=1, keepdim=True) / math.sqrt(d)) for z in (q, k, v))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
        out.append(torch.einsum("bts,bcs->bct", w, v))
    return x + block.proj_out(torch.cat(out, dim=1).reshape(b, c, hh, ww))


@pytest.mark.parametrize("qkv_norm", [True, False])
def test_attention_matches_reference(qkv_norm):
    torch.manual_seed(0)
    block = AttentionBlock(96, num_head_channels=32, qkv_norm=qkv_norm)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 96, 4, 6)
    torch.testing.assert_close(block(x), reference_attention(block, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides", [
    {},
    {"bidirectional": True, "num_classes": 5},
    {"cond_channels": 3, "out_channels": 6, "resblock_updown": False},
])
def test_forward_shape_and_conditioning(overrides):
    cfg = tiny(**overrides)
    net = random_unet(cfg).eval()
    x, kw = inputs(cfg, batch=3)
    y = net(x, **kw)
    assert y.shape == (3, cfg.out_channels, 16, 16) and y.dtype == torch.float32
    for key in ("noise_t", "noise_u", "class_labels", "cond"):  # every input changes the output
        if key in kw:
            other = dict(kw)
            other[key] = kw[key].flip(0) if key != "cond" else torch.randn_like(kw[key])
            assert not torch.allclose(net(x, **other), y)
    if not cfg.resblock_updown:
        assert "input_blocks.2.0.op.weight" in net.state_dict() and "output_blocks.1.2.conv.weight" in net.state_dict()


def test_scalar_noise_label_broadcasts():
    cfg = tiny()
    net = random_unet(cfg).eval()
    x, _ = inputs(cfg)
    torch.testing.assert_close(net(x, torch.tensor(3.0)), net(x, torch.full((2,), 3.0)))


@pytest.mark.parametrize("overrides, drop, message", [
    ({"bidirectional": True}, "noise_u", "noise_u"),
    ({"num_classes": 4}, "class_labels", "class_labels"),
    ({"cond_channels": 1}, "cond", "cond"),
])
def test_missing_conditioning_is_an_error(overrides, drop, message):
    cfg = tiny(**overrides)
    net = UNet(cfg)
    x, kw = inputs(cfg)
    with pytest.raises(ValueError, match=message):  # given to a net without that input
        UNet(tiny())(x, **kw)
    kw.pop(drop)
    with pytest.raises(ValueError, match=message):
        net(x, **kw)


def test_dropout_seed_replays_masks_without_touching_global_rng():
    cfg = tiny(dropout=0.3, bidirectional=True)
    net = random_unet(cfg).train()
    x, kw = inputs(cfg)
    state = torch.random.get_rng_state()
    with net.dropout_seed(7):
        a, b = net(x, **kw), net(x, **kw)
    with net.dropout_seed(8):
        c = net(x, **kw)
    twin = copy.deepcopy(net)  # e.g. the stop-gradient target network of consistency training
    with twin.dropout_seed(7):
        torch.testing.assert_close(twin(x, **kw), a, rtol=0, atol=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, net.eval()(x, **kw))  # the masks are really applied
    net.train()
    assert not torch.allclose(net(x, **kw), net(x, **kw))  # outside the context: fresh masks each pass
    assert all(m.seed is None for m in net._dropouts)


def test_channels_last_matches_contiguous():
    cfg = tiny(bidirectional=True, dropout=0.2)
    net = random_unet(cfg).train()
    x, kw = inputs(cfg)
    with net.dropout_seed(3):
        ref = net(x, **kw)
    net = net.to(memory_format=torch.channels_last)
    with net.dropout_seed(3):
        out = net(x.to(memory_format=torch.channels_last), **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_fp32():
    cfg = tiny()
    net = random_unet(cfg).eval()
    x, kw = inputs(cfg)
    ref = net(x, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, **kw)
    assert out.dtype == torch.float32
    assert (out - ref).norm() < 0.05 * ref.norm()


def test_config_dict_round_trip_and_validation():
    cfg = UNetConfig.preset("imagenet64-bcm")
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({**cfg.to_dict(), "use_scale_shift_norm": True})
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNetConfig.preset("imagenet128")
    bad = [{"attention_resolutions": (4,)}, {"model_channels": 48}, {"num_head_channels": 48},
           {"dropout": 1.0}, {"img_resolution": 31}]
    for change in bad:
        with pytest.raises(ValueError):
            dataclasses.replace(UNetConfig.preset("cifar-tiny"), **change)


def test_scale_shift_norm_follows_adm_formula():
    """use_scale_shift_norm: emb_layers gives 2C = (scale, shift); h = GN(h)(1 + scale) + shift, then SiLU, conv."""
    torch.manual_seed(0)
    block = ResBlock(32, 16, 0.0, 64, scale_shift=True).eval()
    torch.nn.init.normal_(block.out_layers[3].weight, std=0.1)
    assert block.emb_layers[1].out_features == 128
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    h = block.in_layers(x)
    scale, shift = block.emb_layers(emb)[:, :64, None, None], block.emb_layers(emb)[:, 64:, None, None]
    h = block.out_layers[3](torch.nn.functional.silu(block.out_layers[0](h) * (1 + scale) + shift))
    torch.testing.assert_close(block(x, emb), block.skip_connection(x) + h)
    cfg = tiny(scale_shift_norm=True)
    net = random_unet(cfg).eval()
    assert all(m.scale_shift for m in net.modules() if isinstance(m, ResBlock))
    x, kw = inputs(cfg)
    assert net(x, **kw).shape == x.shape
