"""``i2sb``: NVlabs/I2SB (Liu et al. 2023, "I2SB: Image-to-Image Schrödinger Bridge") task checkpoints.

A task folder ``results/<task>/`` holds ``latest.pt`` = ``torch.save({"net": state_dict, "ema": ema_state,
"optimizer": ..., "sched": ...})`` (read with ``torch.load(weights_only=True)``) and ``options.pkl``, a pickle of
the training ``argparse.Namespace`` (with ``pathlib`` paths) read by `read_options`, a restricted unpickler that
only rebuilds ``argparse.Namespace``, pathlib paths and builtin containers / scalars and refuses anything else.

``net`` keys are the ADM keys prefixed ``diffusion_model.``; ``ema["shadow_params"]`` is a list of the EMA weights in
parameter order, matched to the names in the order of ``net`` (every ADM entry is a parameter; official sampling uses
the EMA). The network is guided-diffusion's 256 px ADM with 3 output channels: Conv1d attention and legacy
(heads, three, head_dim) qkv rows, converted as for ``--from guided-diffusion``. It is wrapped by the toolkit's I2SB
wrapper (registered by ``baselines``) with upstream's time input ``noise_label="i2sb"`` and the bridge settings of
``options.pkl`` (``beta_max``, ``interval``, ``ot_ode``, ``t0``, ``T``, ``cond_x1``; absent ones: the task defaults;
``add_x1_noise``, upstream's colourisation-only noisy bridge start, is refused).
The operator the model restores must be given, or is inferred from ``options.corrupt`` where the toolkit has the
same degradation (`CORRUPT_OPERATORS`). docs/models.md#upstream-checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from restore.engine.checkpoints import load_torch_file
from restore.engine.convert import register_converter
from restore.engine.convert.adm import infer_adm_config, load_adm, to_native_layout
from restore.engine.wrappers import get_wrapper

PREFIX = "diffusion_model."
# I2SB task (``--corrupt``) -> the toolkit operator with the same degradation. Not inferred: the free-form masks
# (``inpaint-freeform*``, drawn from mask files) and the blurs (``blur-uni``, ``blur-gauss``), whose kernels the
# toolkit's operators do not reproduce; pass ``operator`` for those.
CORRUPT_OPERATORS = {
    "jpeg-5": "jpeg:quality=5",
    "jpeg-10": "jpeg:quality=10",
    "sr4x-pool": "down:factor=4,kernel=avg",
    "sr4x-bicubic": "down:factor=4,kernel=bicubic",
    "inpaint-center": "box:size=128",
}
_PATHS = ("Path", "PosixPath", "PurePath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
_ALLOWED_GLOBALS = {("argparse", "Namespace"), *(("pathlib", n) for n in _PATHS),
                    *(("pathlib._local", n) for n in _PATHS),
                    *(("builtins", n) for n in ("set", "frozenset", "complex", "bytearray", "slice", "range"))}


class _OptionsUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS`; any other global (a callable a malicious pickle would run) is refused
    before it is imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(Exception):
    pass


def read_options(path: str | Path) -> dict[str, Any]:
    """The fields of an I2SB ``options.pkl`` (a pickled ``argparse.Namespace``) as a dict, unpickled without
    resolving anything but ``argparse.Namespace``, pathlib paths and builtin containers / scalars."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        with open(path, "rb") as f:
            obj = _OptionsUnpickler(f).load()
    except _Refused as e:
        raise ValueError(f"refusing to load {path}: it pickles the global {e.args[0]}; an I2SB options.pkl may only "
                         "hold argparse.Namespace, pathlib paths and plain values") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, MemoryError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable options pickle (truncated or corrupt?): {first}") from None
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    if isinstance(obj, dict):
        return obj
    raise ValueError(f"{path} holds a {type(obj).__name__}, not the argparse.Namespace of I2SB's options.pkl")


def read_i2sb_weights(src: str | Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The un-prefixed ADM state dict of an I2SB ``latest.pt``: the EMA shadow parameters (``weights="ema"``) named
    in the order of ``net``, or ``net`` itself (``weights="net"``)."""
    if weights not in ("ema", "net"):
        raise ValueError(f"weights must be 'ema' or 'net', got {weights!r}")
    ckpt = load_torch_file(src)
    net = ckpt.get("net") if isinstance(ckpt, dict) else None
    if not isinstance(net, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in net.items()):
        raise ValueError(f"{src} is not an I2SB checkpoint: expected a dict with a 'net' state dict")
    if weights == "ema":
        ema = ckpt.get("ema")
        shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
        if not isinstance(shadow, (list, tuple)):
            raise ValueError(f"{src} has no EMA shadow parameters ('ema'/'shadow_params'); pass weights='net'")
        if len(shadow) != len(net):
            raise ValueError(f"{src}: {len(shadow)} EMA parameters for {len(net)} net entries")
        for (key, value), param in zip(net.items(), shadow):
            if not isinstance(param, torch.Tensor) or param.shape != value.shape:
                raise ValueError(f"{src}: EMA parameter for {key} has shape "
                                 f"{getattr(param, 'shape', None)}, the net entry {tuple(value.shape)}")
        net = dict(zip(net, shadow))
    stray = [k for k in net if not k.startswith(PREFIX)]
    if stray:
        raise ValueError(f"{src}: keys without the {PREFIX!r} prefix, e.g. {stray[0]!r}")
    return {k.removeprefix(PREFIX): v for k, v in net.items()}


def _operator_from(options: dict[str, Any], src: str | Path) -> str:
    corrupt = options.get("corrupt")
    if corrupt in CORRUPT_OPERATORS:
        return CORRUPT_OPERATORS[corrupt]
    what = f"its task {corrupt!r} has no equivalent toolkit operator" if corrupt else "no options.corrupt was found"
    raise ValueError(f"{src}: pass --operator (the degradation the model restores): {what}; inferred only for "
                     f"{', '.join(CORRUPT_OPERATORS)}")


def read_i2sb(src: str | Path, *, operator: str | None = None, options: str | Path | None = None,
              weights: str = "ema", img_resolution: int | None = None, num_head_channels: int = 64,
              qkv_order: str = "heads-three-dim", beta_max: float | None = None, ot_ode: bool | None = None,
              interval: int | None = None, wrapper: str | None = None) -> nn.Module:
    """The I2SB-wrapped model of an NVlabs/I2SB ``latest.pt`` ``src``.

    ``options``: the task's ``options.pkl`` (default: next to ``src`` if present). Bridge settings come from it
    (explicit ``beta_max`` / ``ot_ode`` / ``interval`` override; absent everywhere: the operator's task defaults, as
    the I2SB wrapper does); ``operator`` from `CORRUPT_OPERATORS` unless given. ``img_resolution``: options'
    ``image_size``, else 256. ``qkv_order``: legacy, as every released task (guided-diffusion 256 px backbone).
    """
    if wrapper not in (None, "i2sb"):
        raise ValueError(f"I2SB checkpoints are wrapped as 'i2sb', not {wrapper!r}")
    options_path = Path(options) if options is not None else Path(src).with_name("options.pkl")
    opts = read_options(options_path) if options is not None or options_path.is_file() else {}
    if opts.get("add_x1_noise"):  # upstream: "only for decolor", no released task
        raise ValueError(f"{options_path}: add_x1_noise is set (X_1 + N(0, I) at the bridge start), which the "
                         "toolkit's I2SB restorer does not do; such checkpoints are not supported")
    operator = operator or _operator_from(opts, src)
    sd = to_native_layout(read_i2sb_weights(src, weights), qkv_order=qkv_order, num_head_channels=num_head_channels)
    resolution = int(img_resolution or opts.get("image_size") or 256)
    config = infer_adm_config(sd, img_resolution=resolution, num_head_channels=num_head_channels, qkv_norm=False)
    cond_x1 = bool(opts.get("cond_x1", False))
    if cond_x1:  # X_1 concatenated after X_n (upstream ``torch.cat([x, cond], dim=1)``)
        if config.in_channels != 6:
            raise ValueError(f"{src}: options say cond_x1 but the stem takes {config.in_channels} channels, not 6")
        config = dataclasses.replace(config, in_channels=3, cond_channels=3)
    net = load_adm(sd, config, src)
    settings = {"beta_max": beta_max if beta_max is not None else opts.get("beta_max"),
                "ot_ode": ot_ode if ot_ode is not None else opts.get("ot_ode"),
                "interval": interval or opts.get("interval") or 1000}
    return get_wrapper("i2sb")(net, operator=operator, noise_label="i2sb", t0=float(opts.get("t0", 1e-4)),
                               t_end=float(opts.get("T", 1.0)), cond_x1=cond_x1,
                               **{k: v for k, v in settings.items() if v is not None})


register_converter("i2sb", read_i2sb, "NVlabs/I2SB task checkpoints (latest.pt + options.pkl; ImageNet-256)")
