"""Zero-shot restoration with a bidirectional consistency model: invert a little, regenerate, repeat
(Li & He 2024, "Bidirectional Consistency Models", arXiv 2403.18035; bcm.md §3-§5).

One loop, `invert_regenerate`, serves every method. It runs *rounds*; round i brings the current
image to noise level sigma_i and back to sigma_min, then (non-blind methods) applies the operator's
data-consistency projection ``op.project(x, y)``:

- zigzag round (2 NFE), bcm.md §3 "zigzag" and §4 small-noise trick: x <- x + noise z, treat it as the
  PF-ODE point at t = noise, jump **up** noise -> sigma_i ("noise amplification" / inversion), jump
  **down** sigma_i -> sigma_min;
- re-noise round (1 NFE), CM multistep (Song et al. 2023, Algorithm 1): x <- x + sigma_i z, jump
  down sigma_i -> sigma_min. Used only to make odd budgets possible.

A budget of ``nfe`` gives ceil(nfe / 2) rounds: nfe // 2 zigzag rounds, preceded by one re-noise round
when ``nfe`` is odd (nfe = 1: x + sigma_1 z -> sigma_min; nfe = 2: up + down; nfe = 2k: k up/down
rounds; nfe = 3: re-noise round then a zigzag round, like the paper's NFE-3 sampling chain). The
levels decrease geometrically from ``sigma_start`` to ``sigma_end`` over the rounds, or are given
explicitly as ``sigmas`` (one per round).

**How NFE is counted.** One NFE is one ``model.jump`` call on the batch, i.e. one network forward pass;
every jump of the plan is one call, nothing else touches the network (``op.project`` / ``op.pinv`` are
not network calls), so the counted NFE (``model.counter.counting()``) equals ``nfe`` exactly.

Methods (all ``model="bcm"``, any ``nfe >= 1``):

=============== ======= =========================== ==========================================
name            blind   start image                 after every round
=============== ======= =========================== ==========================================
bcm-jpeg        yes     y (the decoded JPEG)        --
bcm-jpeg-dc     no      y                           ``op.project``: clip into y's quantisation cells
bcm-inpaint     no      y, hole <- N(0, fill^2)     ``op.project``: paste the known pixels back
bcm-sr          no      ``op.pinv(y)``              ``op.project``: x + A^+(y - A x)
=============== ======= =========================== ==========================================

Deviations from the paper (whose restoration recipes are not published: bcm.md §5 marks them
UNVERIFIED; the official code only has the JPEG-degradation hook):

- bcm-jpeg (§5.3): the paper describes "small noise -> invert to a moderate sigma -> regenerate, extra
  jumps for NFE 3-4"; the rounds above are our reading. Levels are untuned defaults for CIFAR-10 at
  quality 10 (the paper used ImageNet-64 at quality 20).
- bcm-inpaint (§5.2): the hole is filled with Gaussian noise as in the paper; its std (default
  ``model.sigma_data``) and mean (0) are our choice. The paper's "invert -> regenerate -> paste back,
  decreasing sigma_i" loop is implemented with the small-noise trick before each inversion.
- bcm-sr: not in the paper (a reviewer asked for it); same loop from the pseudo-inverse.
- bcm-jpeg-dc: not in the paper (which is blind); the quantisation-constraint-set projection
  (restoration.md §6.4) added as a hard-consistency switch.
- The projection is applied when a round lands on sigma_min, never after an up-jump: there the state
  is a noisy trajectory point, which y does not constrain.
- The re-noise round (odd NFE) is ours; the paper's restoration NFEs are 2-4 (JPEG) and up to ~14
  (inpainting).

Choosing ``noise``: an up-jump treats x + noise z as a trajectory point at t = noise. A learned BCM
mostly keeps what it does not recognise as noise (JPEG blocks, blur) in its denoised estimate and
amplifies the added noise, which is the paper's "noise amplification". An exact flow map (the oracles
of `restore.engine.oracles`) instead amplifies the image's whole deviation from the data by sigma_i / noise:
up + down then equals one jump from ``noise`` to sigma_min, the up levels do not matter, and a start
far off the data (a noise-filled hole) is sent far off the trajectory. Hence bcm-inpaint starts its
first inversion at t = ``fill``, where the filled hole looks like a trajectory point. The re-noise
level of odd budgets matters for both kinds of model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from operators.utils import Generator, randn
from restore.methods import register_method
from restore.engine.sampling import Callback, sample_plan
from restore.engine.schedules import Jump, Plan, check_plan, plan_nfe

# Default levels (sigma_start, sigma_end) and small noise per task: untuned, chosen from the sizes of the
# degradations on CIFAR-10 in [-1, 1] (JPEG q10 error RMS ~0.13; a 16 px hole needs generation from
# scratch; x2 bicubic SR loses detail of RMS ~0.1) and the paper's small-noise trick (0.07, bcm.md §4).
SMALL_NOISE = 0.07
JPEG_LEVELS = (0.5, 0.2)
INPAINT_LEVELS = (2.0, 0.3)
SR_LEVELS = (1.0, 0.2)


class Round(NamedTuple):
    """One invert/regenerate round: bring the image to level ``sigma`` and back to sigma_min.

    ``noise`` None: re-noise round (x + sigma z, jump down; 1 NFE). Otherwise zigzag round (x + noise z
    treated as the point at t = noise, jump up to ``sigma``, jump down; 2 NFE).
    """

    sigma: float
    noise: float | None = SMALL_NOISE


def round_plan(rnd: Round, sigma_min: float) -> Plan:
    """The jumps of one round (`restore.engine.schedules` plan), ending at ``sigma_min``. The round starts by
    adding ``plan[0].t * z`` to the image (plans start with a jump, so that noise is not part of it)."""
    if rnd.noise is None:
        return check_plan((Jump(rnd.sigma, sigma_min),))
    return check_plan((Jump(rnd.noise, rnd.sigma), Jump(rnd.sigma, sigma_min)))


def restoration_rounds(nfe: int, sigma_start: float, sigma_end: float, noise: float = SMALL_NOISE,
                       sigmas: Sequence[float] | None = None, sigma_min: float = 0.002,
                       first_noise: float | None = None) -> list[Round]:
    """Rounds spending exactly ``nfe`` network evaluations (module docstring): ceil(nfe / 2) levels,
    geometric from ``sigma_start`` to ``sigma_end`` unless ``sigmas`` lists them; the first round is a
    1-NFE re-noise round when ``nfe`` is odd, every other round a 2-NFE zigzag round adding ``noise``
    (``first_noise``, when given, for a zigzag round that comes first)."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    n = (nfe + 1) // 2
    if sigmas is None:
        if not (sigma_start > sigma_min and sigma_end > sigma_min):
            raise ValueError(f"sigma_start and sigma_end must be > sigma_min={sigma_min}, "
                             f"got {sigma_start}, {sigma_end}")
        ratio = sigma_end / sigma_start
        levels = [sigma_start * ratio ** (i / (n - 1)) if n > 1 else sigma_start for i in range(n)]
    else:
        levels = [float(s) for s in sigmas]
        if len(levels) != n:
            raise ValueError(f"nfe={nfe} runs {n} round(s), so sigmas needs {n} level(s), got {len(levels)}")
    first_noise = noise if first_noise is None else first_noise
    if not (noise > 0 and first_noise > 0):
        raise ValueError(f"noise and first_noise must be > 0, got {noise}, {first_noise}")
    odd = nfe % 2  # odd budgets open with a re-noise round
    rounds = [Round(s, None if i < odd else float(first_noise if i == 0 else noise)) for i, s in enumerate(levels)]
    for r in rounds:
        floor, what = (sigma_min, "sigma_min") if r.noise is None else (r.noise, "noise")
        if not r.sigma > floor:
            raise ValueError(f"round level {r.sigma} must exceed {what}={floor}")
    return rounds


def invert_regenerate(model, x: torch.Tensor, rounds: Sequence[Round], *,
                      project: Callable[[torch.Tensor], torch.Tensor] | None = None, generator: Generator = None,
                      callback: Callback = None, extra_args: dict | None = None) -> torch.Tensor:
    """Run ``rounds`` (`Round`) on ``x`` with a BCM, applying ``project`` after each (the core loop of every
    method here). ``callback`` gets the `restore.engine.sampling.sample_plan` payload per jump with ``i`` counted
    over all rounds and ``round`` added. NFE = sum of 1 per re-noise round and 2 per zigzag round."""
    i = 0
    for r, rnd in enumerate(rounds):
        plan = round_plan(rnd, model.sigma_min)
        x = x + plan[0].t * randn(x.shape, generator, device=x.device, dtype=x.dtype)
        on_jump = None if callback is None else (lambda d, i0=i, r=r: callback({**d, "i": d["i"] + i0, "round": r}))
        x = sample_plan(model, x, plan, generator=generator, callback=on_jump, extra_args=extra_args)
        i += plan_nfe(plan)
        if project is not None:
            x = project(x)
    return x


def _run(model, x, nfe, levels, noise, sigmas, project, generator, callback, extra_args, first_noise=None):
    rounds = restoration_rounds(nfe, *levels, noise=noise, sigmas=sigmas, sigma_min=model.sigma_min,
                                first_noise=first_noise)
    return invert_regenerate(model, x, rounds, project=project, generator=generator, callback=callback,
                             extra_args=extra_args)


@register_method("bcm-jpeg", blind=True, model="bcm", operators=("jpeg",), default_nfe=2)
def restore_bcm_jpeg(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None, callback: Callback = None,
                     sigma_start: float = JPEG_LEVELS[0], sigma_end: float = JPEG_LEVELS[1],
                     noise: float = SMALL_NOISE, sigmas: Sequence[float] | None = None,
                     extra_args: dict | None = None) -> torch.Tensor:
    """Blind JPEG restoration with a BCM (Li & He 2024, §5.3 of bcm.md): zigzag invert/regenerate rounds
    from the decoded JPEG; never evaluates the operator."""
    return _run(model, y, nfe, (sigma_start, sigma_end), noise, sigmas, None, generator, callback, extra_args)


@register_method("bcm-jpeg-dc", blind=False, model="bcm", operators=("jpeg",), default_nfe=2)
def restore_bcm_jpeg_dc(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None,
                        callback: Callback = None, sigma_start: float = JPEG_LEVELS[0],
                        sigma_end: float = JPEG_LEVELS[1], noise: float = SMALL_NOISE,
                        sigmas: Sequence[float] | None = None, extra_args: dict | None = None) -> torch.Tensor:
    """BCM JPEG restoration with data consistency: bcm-jpeg plus the quantisation-cell projection
    (op.project) after every round."""
    return _run(model, y, nfe, (sigma_start, sigma_end), noise, sigmas, lambda x: op.project(x, y), generator,
                callback, extra_args)


@register_method("bcm-inpaint", blind=False, model="bcm", operators=("box", "randbox"), default_nfe=4)
def restore_bcm_inpaint(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None,
                        callback: Callback = None, sigma_start: float = INPAINT_LEVELS[0],
                        sigma_end: float = INPAINT_LEVELS[1], noise: float = SMALL_NOISE,
                        sigmas: Sequence[float] | None = None, fill: float | None = None,
                        extra_args: dict | None = None) -> torch.Tensor:
    """BCM box inpainting (Li & He 2024, §5.2 of bcm.md): hole filled with Gaussian noise (std ``fill``,
    default model.sigma_data), invert/regenerate rounds with decreasing levels, known pixels pasted back
    (op.project) after every round.

    A first zigzag round starts from t = max(``fill``, ``noise``), not from the small ``noise``: with
    fill = sigma_data the hole is then N(0, 2 fill^2), the marginal of data with std sigma_data at that
    level, whereas from t = 0.07 the up-jump amplifies the hole's noise by sigma_start / 0.07, far off the
    trajectory (empirical oracle, 32 CIFAR-10 images, nfe 2, sigma_start 5: 17.9 dB PSNR from t = 0.07,
    below the 18.8 dB input; 32.3 dB from t = fill).
    """
    fill = model.sigma_data if fill is None else float(fill)
    observed = op.mask_for(y)
    x = torch.where(observed, y, fill * randn(y.shape, generator, device=y.device, dtype=y.dtype))
    return _run(model, x, nfe, (sigma_start, sigma_end), noise, sigmas, lambda x: op.project(x, y), generator,
                callback, extra_args, first_noise=max(fill, noise))


@register_method("bcm-sr", blind=False, model="bcm", operators=("down",), default_nfe=2)
def restore_bcm_sr(model, y: torch.Tensor, op, *, nfe: int, generator: Generator = None, callback: Callback = None,
                   sigma_start: float = SR_LEVELS[0], sigma_end: float = SR_LEVELS[1], noise: float = SMALL_NOISE,
                   sigmas: Sequence[float] | None = None, extra_args: dict | None = None) -> torch.Tensor:
    """BCM super-resolution (extension; not in the paper): from op.pinv(y), invert/regenerate rounds with
    the range-null-space projection op.project after every round."""
    return _run(model, op.pinv(y), nfe, (sigma_start, sigma_end), noise, sigmas, lambda x: op.project(x, y),
                generator, callback, extra_args)
