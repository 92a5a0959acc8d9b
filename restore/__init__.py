"""Zero-shot image restoration with Bidirectional Consistency Models (BCM).

The user-facing package: networks and model wrappers (`restore.models`), samplers and inversions
(`restore.sampling`, `restore.inversion`), checkpoints (`restore.checkpoints`), image I/O
(`restore.io`) and the ``restore`` command line (`restore.cli`). Degradations live in
:mod:`operators`, baselines in :mod:`baselines`, the benchmark harness in :mod:`benchmarks`.
"""

from restore.checkpoints import list_models, load_model, save_model

__all__ = ["list_models", "load_model", "save_model"]
