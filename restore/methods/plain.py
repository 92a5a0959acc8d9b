"""Network-free reference rows for every results table: the degraded input, its pseudo-inverse and
bicubic upsampling (model="none", 0 NFE; docs/methods.md#plain-references "sanity anchors").

- ``identity``: the degraded input itself, shown at the clean image's size. For operators that keep
  the size (JPEG: the decoded image; box, randbox, randmask: the zero-filled image; blur: the blurred image)
  that is ``y``; for ``down`` it is
  nearest-neighbour upsampling, i.e. every low-resolution pixel repeated as a K x K block (what an
  image viewer shows; for ``kernel=avg`` it equals the pseudo-inverse).
- ``pinv``: ``op.pinv(y)``, the minimum-norm consistent image of linear operators (for JPEG the decoded
  image, docs/design.md#operators): ``op(pinv(y)) = y`` up to rounding for masks, ``down`` and noiseless
  ``blur``.
- ``bicubic`` (``down`` only): ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
  antialias=False)`` (Keys a = -0.75, PyTorch's default) — the classic SR baseline, independent of
  the kernel that downsampled.

All three ignore ``model``, ``nfe``, ``generator``, ``callback`` and ``class_labels`` (no network to condition).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from restore.methods import register_method

PLAIN_OPERATORS = ("jpeg", "box", "randbox", "randmask", "down", "blur")


@register_method("identity", blind=True, model="none", operators=PLAIN_OPERATORS, default_nfe=0)
def restore_identity(model, y: torch.Tensor, op, *, nfe: int = 0, generator=None, callback=None,
                     class_labels=None) -> torch.Tensor:
    """The degraded input itself (down: nearest-neighbour upsampling to the clean size)."""
    if op.name == "down":
        return F.interpolate(y, scale_factor=op.params["factor"], mode="nearest")
    return y.clone()


@register_method("pinv", blind=False, model="none", operators=PLAIN_OPERATORS, default_nfe=0)
def restore_pinv(model, y: torch.Tensor, op, *, nfe: int = 0, generator=None, callback=None,
                 class_labels=None) -> torch.Tensor:
    """The operator's pseudo-inverse op.pinv(y) (JPEG: the decoded image)."""
    return op.pinv(y)


@register_method("bicubic", blind=True, model="none", operators=("down",), default_nfe=0)
def restore_bicubic(model, y: torch.Tensor, op, *, nfe: int = 0, generator=None, callback=None,
                    class_labels=None) -> torch.Tensor:
    """Bicubic upsampling by the operator's factor (PyTorch, no antialiasing)."""
    return F.interpolate(y, scale_factor=op.params["factor"], mode="bicubic", align_corners=False, antialias=False)
