"""Speed options of a loaded model for a run, applied in one place: :func:`Acceleration.apply`, called where
`restore run` (:mod:`restore.app.run`), the benchmark runner and its cost estimate load their models.

- ``bf16``: the network runs under bf16 autocast on CUDA and CPU (the wrapper's ``autocast_dtype``);
  preconditioning and sampler arithmetic stay float32 (docs/design.md#noise-levels).
- ``channels_last``: the network's weights in channels_last memory format; cuDNN and oneDNN then keep the
  activations channels_last too (the layout tensor cores prefer), although the wrapper hands the network NCHW.
- ``compile``: ``torch.compile`` of the network only (in place); the first calls compile, which on a CPU costs
  more than it saves for short runs.

They change rounding, not the algorithm: like the device they are recorded with a run but are not part of a
benchmark cell's key, and ``restore run`` resumes across them (training treats them the same way,
`training.loop.RUNTIME_FIELDS`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Acceleration:
    """bf16 autocast, channels_last weights, torch.compile of the network (all off by default)."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` (a wrapper of :mod:`restore.engine.wrappers`) with these options, changed in place."""
        if self.bf16:
            model.autocast_dtype = torch.bfloat16
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            model.net.compile()
        return model

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)


OFF = Acceleration()  # every option off: the default of every run
