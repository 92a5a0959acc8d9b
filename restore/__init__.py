"""Zero-shot image restoration with Bidirectional Consistency Models (BCM).

The user-facing package: networks and model wrappers (`restore.engine.wrappers`), samplers and inversions
(`restore.engine.sampling`, `restore.engine.bcm_inversion`), checkpoints (`restore.engine.checkpoints`), image I/O
(`restore.app.io`) and the ``restore`` command line (`restore.app.cli`). Degradations live in
:mod:`operators`, baselines in :mod:`baselines`, the benchmark harness in :mod:`benchmarks`.
"""

from restore.engine.checkpoints import list_models, load_model, save_model
from restore.runtime.seeds import measurement_generators, restoration_generators

__all__ = ["list_models", "load_model", "measurement_generators", "restoration_generators", "save_model"]
