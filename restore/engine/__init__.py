"""The engine: networks, model wrappers, noise schedules, samplers, inversions, checkpoints and conversion,
NFE counting, seeds and closed-form oracles. It imports nothing from the rest of ``restore`` (see
docs/design.md, "Layers")."""
