"""How the toolkit runs, shared by every layer: atomic files, seeds, progress bars and the distributed setup.
It imports nothing from the rest of ``restore`` (see docs/design.md, "Layers")."""
