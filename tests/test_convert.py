"""Converter for official BCM-iCT-torch checkpoints: config inference, strict loading, refusal to unpickle."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch

from restore.engine.checkpoints import load_model, load_state_dict_file, read_metadata
from restore.engine.convert import convert_checkpoint
from restore.engine.convert.bcm_ict import infer_bcm_ict_config
from restore.engine.networks import UNet, UNetConfig
from restore.engine.wrappers import BCM, ConsistencyModel

LAYOUT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bcm_imagenet64_layout.json"


def official_like_state_dict(config: UNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random flat state dict with the official key names and shapes of ``config`` (what torch.save wrote)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


@pytest.mark.parametrize("preset", ["imagenet64-bcm", "imagenet64-ict"])
def test_infers_official_imagenet64_config_from_layout(preset):
    """The full ImageNet-64 key/shape list (meta tensors, nothing allocated) gives back the official config."""
    if preset == "imagenet64-bcm" and LAYOUT.is_file():
        shapes = json.loads(LAYOUT.read_text())["keys"]
    else:
        with torch.device("meta"):
            shapes = {k: list(v.shape) for k, v in UNet(UNetConfig.preset(preset)).state_dict().items()}
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = infer_bcm_ict_config(sd)
    assert config == UNetConfig.preset(preset)
    with torch.device("meta"):
        UNet(config).load_state_dict(sd, strict=True, assign=True)


@pytest.mark.parametrize("overrides", [
    {"num_res_blocks": 6},  # the "deep" variants
    {"num_res_blocks": 1, "channel_mult": (1, 2), "attention_resolutions": (32,), "resblock_updown": False},
    {"num_classes": 0, "channel_mult": (1, 1, 2, 2, 4), "attention_resolutions": (64, 4)},
])
def test_infers_other_architectures(overrides):
    config = UNetConfig.preset("imagenet64-bcm", **overrides)
    with torch.device("meta"):
        sd = UNet(config).state_dict()
    assert infer_bcm_ict_config(sd) == config


@pytest.mark.parametrize("bidirectional", [True, False])
def test_convert_scaled_down_official_checkpoint(tmp_path, bidirectional):
    """imagenet64 structure (4 levels, 3 blocks, attention at 16/8, classes) with 32 base channels."""
    config = UNetConfig.preset("imagenet64-bcm", model_channels=32, num_head_channels=32, num_classes=10,
                               bidirectional=bidirectional)
    sd = official_like_state_dict(config)
    src = tmp_path / "ema_0.99997_000001.pt"
    torch.save(sd, src)
    dst = convert_checkpoint(src, tmp_path / "converted.safetensors", "bcm-ict", num_head_channels=32)

    model = load_model(dst)
    assert type(model) is (BCM if bidirectional else ConsistencyModel)
    assert model.net.config == config
    assert (model.sigma_min, model.sigma_max, model.sigma_data) == (0.002, 80.0, 0.5)
    assert read_metadata(dst)["card"]["source"] == src.name
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in sd.items())

    reference = UNet(config).eval()
    reference.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    kw = {"noise_t": torch.tensor([100.0, -500.0]), "class_labels": torch.tensor([3, 7])}
    if bidirectional:
        kw["noise_u"] = torch.tensor([-1500.0, 900.0])
    torch.testing.assert_close(model.net(x, **kw), reference(x, **kw), rtol=0, atol=0)


def test_mismatching_state_dict_is_an_error(tmp_path):
    config = UNetConfig.preset("cifar-tiny", img_resolution=16, attention_resolutions=(8,))
    sd = official_like_state_dict(config)
    sd["middle_block.1.qkv.weight"] = sd["middle_block.1.qkv.weight"][:-1]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not match the inferred architecture"):
        convert_checkpoint(tmp_path / "bad.pt", tmp_path / "out.safetensors", "bcm-ict", img_resolution=16,
                           num_head_channels=32)
    with pytest.raises(ValueError, match="unknown checkpoint format 'k-diffusion'"):
        convert_checkpoint(tmp_path / "bad.pt", tmp_path / "out.safetensors", "k-diffusion")


class Payload:
    """An arbitrary object: unpickling it would run code chosen by the file's author."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    sd = official_like_state_dict(UNetConfig.preset("cifar-tiny", img_resolution=16, attention_resolutions=(8,)))
    torch.save({**sd, "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to load .*evil.pt"):
        convert_checkpoint(tmp_path / "evil.pt", tmp_path / "out.safetensors", "bcm-ict")
    assert not marker.exists()
    torch.save({"model": sd}, tmp_path / "nested.pt")  # loadable, but not the official flat layout
    with pytest.raises(ValueError, match="not a flat state dict"):
        load_state_dict_file(tmp_path / "nested.pt")



@pytest.mark.parametrize("order", ["heads-three-dim", "heads-dim-three"])
def test_qkv_row_permutation_matches_the_index_formula(order):
    """new[j] = old[perm[j]] with j running over (three, head, i), outer to inner (docs/models.md)."""
    from restore.engine.convert.layout import qkv_rows_to_native

    heads, d = 3, 4
    old = torch.randn(3 * heads * d, 5, 1, 1)
    if order == "heads-three-dim":
        perm = [h * 3 * d + t * d + i for t in range(3) for h in range(heads) for i in range(d)]
    else:
        perm = [h * 3 * d + i * 3 + t for t in range(3) for h in range(heads) for i in range(d)]
    assert torch.equal(qkv_rows_to_native(old, heads, order), old[perm])
    assert torch.equal(qkv_rows_to_native(old[:, 0, 0, 0], heads, order), old[perm, 0, 0, 0])
    assert torch.equal(qkv_rows_to_native(old, heads, "three-heads-dim"), old)
    with pytest.raises(ValueError, match="do not split"):
        qkv_rows_to_native(old[:-1], heads, order)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA")])])
def test_converted_checkpoint_loads_on_cuda(tmp_path, device):
    """Converted on the CPU, loaded straight onto the GPU (safetensors to the device): the same network."""
    config = UNetConfig.preset("imagenet64-bcm", model_channels=32, num_head_channels=32, num_classes=10)
    sd = official_like_state_dict(config)
    torch.save(sd, tmp_path / "ema.pt")
    dst = convert_checkpoint(tmp_path / "ema.pt", tmp_path / "converted.safetensors", "bcm-ict", num_head_channels=32)
    model = load_model(dst, device=device)
    assert {p.device.type for p in model.parameters()} == {torch.device(device).type}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kw = {"noise_t": torch.tensor([100.0, -500.0]), "class_labels": torch.tensor([3, 7]),
          "noise_u": torch.tensor([-1500.0, 900.0])}
    with torch.inference_mode():
        on_device = model.net(x.to(device), **{k: v.to(device) for k, v in kw.items()})
        on_cpu = load_model(dst).net(x, **kw)
    torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
