"""How the toolkit runs, shared by every layer: atomic files, seeds, progress bars, the distributed setup and stop
signals.
It imports nothing from the rest of ``restore`` (see docs/design.md, "Layers")."""
