"""Counting a network's FLOPs: one counter for training compute (:mod:`training.flops`) and the benchmark cost
estimate (:mod:`benchmarks.runner.cost`).

:class:`torch.utils.flop_counter.FlopCounterMode` counts matrix products and convolutions (attention's products
included), forward and backward, not element-wise work. Its registry lacks the fused CPU attention kernel that
``scaled_dot_product_attention`` takes e.g. for channels_last inputs, which would silently drop attention from the
count: :func:`flop_counter` adds it with the formulas of the GPU kernels.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["flop_counter"]


def _cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward}


def flop_counter() -> FlopCounterMode:
    """A silent :class:`~torch.utils.flop_counter.FlopCounterMode` that also counts the fused CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=_FORMULAS)
