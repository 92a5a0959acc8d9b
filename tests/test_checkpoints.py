"""Checkpoints: safetensors round trip (fp32 exact, fp16 close), metadata, wrapper registry, bundled names."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from restore.engine import checkpoints
from restore.engine.checkpoints import list_models, load_model, read_metadata, save_model
from restore.engine.networks import UNet, UNetConfig, count_parameters
from restore.engine.wrappers import register_wrapper

CONFIG = UNetConfig.preset("cifar-tiny", img_resolution=16, attention_resolutions=(8,), bidirectional=True,
                           num_classes=3, dropout=0.1)


class TinyWrapper(nn.Module):
    """Stand-in for the real wrappers: F(x, ln t, ln u) with stored constants."""

    def __init__(self, net, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5):
        super().__init__()
        self.net, self.sigma_min, self.sigma_max, self.sigma_data = net, sigma_min, sigma_max, sigma_data

    def forward(self, x, t, u, labels):
        return self.net(x, torch.log(t), torch.log(u), class_labels=labels)


register_wrapper("test-tiny", TinyWrapper)


@pytest.fixture(scope="module")
def model() -> TinyWrapper:
    net = UNet(CONFIG)
    g = torch.Generator().manual_seed(0)
    torch.nn.utils.vector_to_parameters(torch.randn(count_parameters(net), generator=g) * 0.05, net.parameters())
    return TinyWrapper(net, sigma_min=0.01, sigma_max=40.0, sigma_data=0.25)


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    return x, torch.tensor([1.0, 5.0]), torch.tensor([0.1, 20.0]), torch.tensor([0, 2])


def test_fp32_round_trip_is_exact(model, tmp_path):
    card = {"data": "none", "fid": None}
    path = save_model(model, tmp_path / "m.safetensors", card=card)
    loaded = load_model(path)
    assert type(loaded) is TinyWrapper and not loaded.training
    assert loaded.net.config == CONFIG
    assert (loaded.sigma_min, loaded.sigma_max, loaded.sigma_data) == (0.01, 40.0, 0.25)
    assert loaded.card == card
    ref, new = model.net.state_dict(), loaded.net.state_dict()
    assert list(ref) == list(new) and all(torch.equal(ref[k], new[k]) for k in ref)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in loaded.net.parameters())
    torch.testing.assert_close(loaded(*batch()), model.eval()(*batch()), rtol=0, atol=0)
    meta = read_metadata(path)
    assert meta["wrapper"] == "test-tiny" and meta["dtype"] == "float32" and meta["unet"] == CONFIG.to_dict()


def test_fp16_storage_is_close(model, tmp_path):
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    path = save_model(channels_last, tmp_path / "m16.safetensors", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as f:
        # a safetensors handle is not a dict: it has keys() but no __iter__, so SIM118's `for k in f` would raise
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    loaded = load_model(path)
    for (k, p), q in zip(model.net.state_dict().items(), loaded.net.state_dict().values()):
        assert q.dtype == torch.float32
        torch.testing.assert_close(q, p, rtol=2**-10, atol=1e-7, msg=k)
    torch.testing.assert_close(loaded(*batch()), model.eval()(*batch()), rtol=1e-2, atol=1e-3)


def test_load_in_half_precision_keeps_caller_dtype(model, tmp_path):
    loaded = load_model(save_model(model, tmp_path / "m.safetensors"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.net.parameters()} == {torch.bfloat16}
    out, ref = loaded(*batch()), model.eval()(*batch())
    assert out.dtype == torch.float32
    assert (out - ref).norm() < 0.05 * ref.norm()


def test_registry_errors(model, tmp_path):
    class Other(TinyWrapper):
        pass

    with pytest.raises(ValueError, match="not a registered wrapper"):
        save_model(Other(model.net), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="already registered"):
        register_wrapper("test-tiny", Other)
    register_wrapper("test-tiny", TinyWrapper)  # re-registering the same class is harmless
    path = tmp_path / "w.safetensors"
    save_model(model, path)
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    tensors = load_model(path).net.state_dict()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**raw, "wrapper": "no-such-wrapper"})
    with pytest.raises(ValueError, match="unknown model wrapper 'no-such-wrapper'"):
        load_model(tmp_path / "bad.safetensors")


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a bcm-restore/1 checkpoint"):
        load_model(path)


def test_bundled_names(model, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(checkpoints, "BUNDLED_MODELS", {
        "tiny-demo": checkpoints.BundledModel("tiny.safetensors", "a tiny test model", "unit tests"),
        "missing-demo": checkpoints.BundledModel("missing.safetensors", "not shipped", "nothing"),
    })
    save_model(model, tmp_path / "tiny.safetensors", dtype=torch.float16, card={"recipe": "restore-train edm"})
    assert type(load_model("tiny-demo")) is TinyWrapper
    assert [m["card"] for m in list_models()] == [None, {"recipe": "restore-train edm"}]
    assert [(m["name"], m["available"]) for m in list_models()] == [("missing-demo", False), ("tiny-demo", True)]
    json.dumps(list_models())  # `restore models --json` can print it as is
    with pytest.raises(ValueError, match="bundled models: missing-demo, tiny-demo"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="file .* is missing"):
        load_model("missing-demo")


def test_weights_hash_ignores_the_card_only(tmp_path):
    from restore.engine.checkpoints import weights_sha256
    from restore.engine.wrappers import EDMDenoiser

    torch.manual_seed(0)
    model = EDMDenoiser(UNet(UNetConfig.preset("cifar-tiny", img_resolution=8, attention_resolutions=())))
    a = weights_sha256(save_model(model, tmp_path / "a.safetensors", card={"notes": "first"}))
    assert weights_sha256(save_model(model, tmp_path / "b.safetensors", card={"notes": "edited", "metrics": {}})) == a
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1
    assert weights_sha256(save_model(model, tmp_path / "c.safetensors", card={"notes": "first"})) != a
