"""The method registry: registration, lookup errors, operator support, NFE defaults."""

from __future__ import annotations

import pytest
import torch

from operators import build_operator
from restore.engine import plugins
from restore.methods import get_method, list_methods, register_method
from restore.methods import registry as methods


@pytest.fixture
def registry(monkeypatch):
    """An empty registry for the test (no plugins), restored afterwards."""
    monkeypatch.setattr(methods, "_METHODS", {})
    monkeypatch.setattr(plugins, "_loaded", True)


def test_register_call_and_describe(registry):
    @register_method("scale", blind=True, model="none", operators=("jpeg",), default_nfe=3)
    def restore_scale(model, y, op, *, nfe, generator=None, callback=None, factor=1.0):
        """Multiply by a factor, nfe times.

        More text."""
        return y * factor ** nfe

    method = get_method("scale")
    y = torch.ones(1, 3, 8, 8)
    assert torch.equal(method(None, y, build_operator("jpeg:quality=50"), factor=2.0), y * 8)  # default nfe 3
    assert torch.equal(method(None, y, build_operator("jpeg:quality=50"), nfe=1, factor=2.0), y * 2)
    with pytest.raises(ValueError, match="does not support operator 'box'; it supports: jpeg"):
        method(None, y, build_operator("box:size=4"))
    assert list_methods() == [{"name": "scale", "blind": True, "operators": ["jpeg"], "model": "none",
                               "default_nfe": 3, "needs_grad": False,
                               "description": "Multiply by a factor, nfe times."}]


def test_errors(registry):
    with pytest.raises(ValueError, match="unknown method 'nope'; registered: \\(none\\)"):
        get_method("nope")
    with pytest.raises(ValueError, match="model must be a wrapper name"):
        register_method("x", blind=True, model="")
    register_method("gan-method", blind=True, model="gan")(lambda *a, **k: None)  # a plugin's own wrapper kind
    assert get_method("gan-method").model == "gan"

    @register_method("x", blind=True, model="none")
    def first(model, y, op, *, nfe, generator=None, callback=None):
        return y

    register_method("x", blind=True, model="none")(first)  # re-registering the same function is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_method("x", blind=True, model="none")(lambda *a, **k: None)
