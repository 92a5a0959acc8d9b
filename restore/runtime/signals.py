"""Stopping a long job from outside. SIGTERM (what ``kill``, schedulers and ending sessions send) and SIGINT raise
KeyboardInterrupt in the main thread, so the job's own interrupt handling runs: a trainer saves its state, a campaign
stops its children. SIGINT is included because a shell starts background jobs with it ignored, and children inherit
that."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def interrupt_on_stop() -> Iterator[None]:
    """Within the block, a stop signal raises KeyboardInterrupt; the previous handlers come back after it. Does
    nothing outside the main thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
