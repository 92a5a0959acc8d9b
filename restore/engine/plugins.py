"""Plugins: modules listed in the entry-point group ``bcm_restore.methods`` register restoration methods and
model wrappers when imported. They are imported once, the first time a registry is asked for a name it does
not know, so ``restore`` never imports ``baselines`` (or a third-party package) by name."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "bcm_restore.methods"

_loaded = False


def load_plugins() -> None:
    """Import every module of the entry-point group (once per process)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        import_module(entry.value)
