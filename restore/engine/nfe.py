"""Measured NFE: every model wrapper counts the network evaluations it makes.

docs/design.md#conventions: tables report the *counted* number of function evaluations. A forward pass of the
network is one NFE; a backward pass through a network output (DPS-style guidance) is counted
separately, because it costs about as much as a forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class NFECount:
    """Network forward calls and backward passes through their outputs."""

    forward: int = 0
    backward: int = 0


class NFECounter(NFECount):
    """Running totals for one model wrapper, plus live tallies for `counting()` blocks.

    `record(out)` is called by the wrapper on every raw network output: it adds one forward call
    and, when ``out`` requires grad, registers a hook that adds one backward pass each time a
    gradient flows through ``out``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tallies: list[NFECount] = []

    def reset(self) -> None:
        """Zero the running totals (open `counting()` tallies are not affected)."""
        self.forward = 0
        self.backward = 0

    @contextmanager
    def counting(self) -> Iterator[NFECount]:
        """Count the calls made inside the block in a fresh `NFECount`, without resetting the totals.

        Blocks nest. Backward passes are attributed to the block that produced the network output,
        even if ``.backward()`` runs after the block has exited.
        """
        tally = NFECount()
        self._tallies.append(tally)
        try:
            yield tally
        finally:
            self._tallies.remove(tally)

    def record(self, out: torch.Tensor) -> torch.Tensor:
        """Count one network forward pass producing ``out`` (returned unchanged)."""
        targets = [self, *self._tallies]
        for c in targets:
            c.forward += 1
        if out.requires_grad:

            def count_backward(grad: torch.Tensor) -> None:
                for c in targets:
                    c.backward += 1

            out.register_hook(count_backward)
        return out

    def __repr__(self) -> str:
        return f"NFECounter(forward={self.forward}, backward={self.backward})"
