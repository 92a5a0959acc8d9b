"""The method registry: registration, lookup errors, operator support, NFE defaults."""

from __future__ import annotations

import inspect

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
    def restore_scale(model, y, op, *, nfe, generator=None, callback=None, class_labels=None, factor=1.0):
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
                               "default_nfe": 3, "needs_grad": False, "space": {},
                               "description": "Multiply by a factor, nfe times."}]


def test_errors(registry):
    with pytest.raises(ValueError, match="unknown method 'nope'; registered: \\(none\\)"):
        get_method("nope")
    with pytest.raises(ValueError, match="model must be a wrapper name"):
        register_method("x", blind=True, model="")
    register_method("gan-method", blind=True, model="gan")(lambda *a, **k: None)  # a plugin's own wrapper kind
    assert get_method("gan-method").model == "gan"

    @register_method("x", blind=True, model="none")
    def first(model, y, op, *, nfe, generator=None, callback=None, class_labels=None):
        return y

    register_method("x", blind=True, model="none")(first)  # re-registering the same function is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_method("x", blind=True, model="none")(lambda *a, **k: None)


def test_search_spaces_name_keywords_and_contain_the_defaults():
    from restore.methods import Float

    tuned = 0
    for entry in list_methods():
        method = get_method(entry["name"])
        params = inspect.signature(method.fn).parameters
        for name, dist in method.space.items():
            default = params[name].default
            tuned += 1
            if default is None or default is inspect.Parameter.empty:
                continue  # chosen per operator inside the method (e.g. DPS's step size)
            if isinstance(dist, Float):
                assert dist.low <= default <= dist.high, (entry["name"], name, default)
            else:
                assert default in dist.choices, (entry["name"], name, default)
        assert entry["space"] == {k: v.describe() for k, v in method.space.items()}
    assert tuned >= 20
    with pytest.raises(ValueError, match="not keywords"):
        register_method("space-typo", blind=True, model="none", space={"sigmaa": Float(0.1, 1.0)})(
            lambda model, y, op, *, nfe, generator=None, callback=None, class_labels=None, sigma=0.5: y)
    with pytest.raises(ValueError, match="must take the keyword class_labels"):  # the contract is checked
        register_method("no-labels", blind=True, model="none")(lambda model, y, op, *, nfe, generator=None: y)
