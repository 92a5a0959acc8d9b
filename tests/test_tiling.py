"""Tiling: geometry covers every pixel on the operator's grid, weights sum to one, local maps are
reproduced exactly, tiles disagreeing blend without a seam, per-tile keys do not depend on the batch."""

from __future__ import annotations

import math

import pytest
import torch

from operators import build_operator
from operators.utils import randn
from restore.app.tiling import TileRule, blend_window, padded_length, tile_rule, tile_starts, tiled_restore

GEOMETRIES = [(64, 64, 16, 16), (80, 64, 16, 16), (200, 64, 16, 16), (37, 8, 2, 1), (100, 32, 8, 1),
              (96, 32, 0, 16), (40, 16, 4, 4), (33, 33, 5, 1)]


@pytest.mark.parametrize("length, tile, overlap, align", GEOMETRIES)
def test_tile_starts_cover_on_the_grid_with_the_fewest_tiles(length, tile, overlap, align):
    padded = padded_length(length, tile, align)
    assert padded >= max(length, tile) and (padded - tile) % align == 0
    assert padded == tile if length <= tile else padded - align < length  # the least padding
    starts = tile_starts(padded, tile, overlap, align)
    assert starts[0] == 0 and starts[-1] == padded - tile
    assert all(s % align == 0 for s in starts)
    assert all(tile - (b - a) >= overlap and b > a for a, b in zip(starts, starts[1:]))
    covered = torch.zeros(padded, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    # One tile fewer cannot keep the overlap: the n-1 gaps would need more than the largest allowed step.
    max_step = (tile - overlap) // align * align
    assert len(starts) == 1 or (len(starts) - 2) * max_step < padded - tile


def test_bad_overlap_and_length_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(128, 64, 56, 16)  # the step would be below one grid unit
    with pytest.raises(ValueError, match="multiple"):
        tile_starts(70, 64, 16, 16)


def test_blend_window_is_a_positive_raised_cosine_ramp():
    w = blend_window(16, 4, dtype=torch.float64)
    assert (w > 0).all() and torch.equal(w, w.flip(0)) and (w[4:12] == 1).all()
    ramp = w[:4]
    torch.testing.assert_close(ramp + ramp.flip(0), torch.ones(4, dtype=torch.float64))  # crossfades sum to 1


def test_tile_rule_only_for_local_operators():
    assert tile_rule(build_operator("jpeg:quality=10")) == TileRule(1, 16)
    assert tile_rule(build_operator("down:factor=4,kernel=bicubic")) == TileRule(4, 1)
    assert tile_rule(build_operator("box:size=8")) is None and tile_rule(build_operator("randbox:size=8")) is None


@pytest.mark.parametrize("size", [(64, 64), (50, 90), (20, 12), (33, 48)])
def test_pointwise_map_is_reproduced_and_weights_sum_to_one(size):
    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 3, *size, generator=g) * 2 - 1
    ones = tiled_restore(lambda t, k: torch.ones_like(t), y, tile=32, overlap=8, rule=TileRule(1, 16), batch_size=3)
    assert ones.shape == y.shape and torch.equal(ones, torch.ones_like(y))  # sum_k w_k / sum_k w_k, bit-exact
    out = tiled_restore(lambda t, k: torch.tanh(3 * t), y, tile=32, overlap=8, rule=TileRule(1, 16), batch_size=3)
    torch.testing.assert_close(out, torch.tanh(3 * y), rtol=0, atol=1e-6)


def test_down_tiles_in_the_measurement_domain():
    """A block-local restorer (the avg pseudo-inverse, nearest upsampling) tiled = untiled."""
    op = build_operator("down:factor=2,kernel=avg")
    y = torch.rand(1, 3, 13, 22, generator=torch.Generator().manual_seed(1)) * 2 - 1
    seen = []

    def restore(tiles, keys):
        seen.append(tuple(tiles.shape[-2:]))
        return op.pinv(tiles)

    out = tiled_restore(restore, y, tile=16, overlap=2, rule=tile_rule(op))
    assert set(seen) == {(8, 8)}
    assert out.shape == (1, 3, 26, 44)
    torch.testing.assert_close(out, op.pinv(y), rtol=0, atol=1e-6)
    torch.testing.assert_close(op(out), y, rtol=0, atol=1e-5)  # still consistent with the measurement


def test_disagreeing_tiles_blend_without_seams():
    """Tiles returning different constants: the output crossfades; a hard cut would jump by the full gap."""
    y = torch.zeros(1, 1, 8, 64)
    levels = torch.tensor([0.0, 1.0, -1.0, 0.5, 2.0])

    def restore(tiles, keys):
        return torch.stack([torch.full_like(t, levels[k].item()) for t, k in zip(tiles, keys)])

    out = tiled_restore(restore, y, tile=16, overlap=4, rule=TileRule(), batch_size=2)[0, 0, 0]
    gap = (levels[1:] - levels[:-1]).abs().max()
    jumps = (out[1:] - out[:-1]).abs()
    assert jumps.max() <= gap * math.sin(math.pi / 8) + 1e-6  # steepest step of a 4-pixel sin^2 crossfade
    assert out[0] == levels[0] and out[-1] == levels[4]


def test_tile_keys_and_results_do_not_depend_on_batch_size():
    def restore(tiles, keys):
        gens = [torch.Generator().manual_seed(k) for k in keys]
        return tiles + randn(tiles.shape, gens)

    y = torch.zeros(1, 3, 40, 56)
    outs = [tiled_restore(restore, y, tile=16, overlap=4, batch_size=b) for b in (1, 5, 100)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
