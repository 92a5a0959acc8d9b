"""`restore` command line: restore image folders, list models and methods, convert checkpoints.

Progress goes to stderr, machine-readable results to stdout; user errors exit non-zero with one line.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click


def acceleration_options(f):
    """The speed options of a run (`restore.engine.acceleration`), handed to the command as one ``acceleration``
    argument; shared by `restore run` and `restore-bench run`."""

    @functools.wraps(f)
    def command(*args, bf16: bool, channels_last: bool, compile: bool, **kwargs):
        from restore.engine.acceleration import Acceleration

        return f(*args, acceleration=Acceleration(bf16, channels_last, compile), **kwargs)

    options = (click.option("--bf16", is_flag=True, help="bf16 autocast for the network (CUDA and CPU)."),
               click.option("--channels-last", is_flag=True, help="channels_last memory format for the network."),
               click.option("--compile", is_flag=True, help="torch.compile the network (pays off on long GPU runs)."))
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bcm-restore")
def main() -> None:
    """Zero-shot image restoration with Bidirectional Consistency Models.

    \b
    Examples:
      restore run photos/ restored/ --operator jpeg:quality=10 --method bcm-jpeg --model bcm-imagenet64.safetensors
      restore methods
      restore models
      restore convert ema_0.99997_234000.pt bcm-imagenet64.safetensors --from bcm-ict
      restore convert 256x256_diffusion_uncond.pt adm256.safetensors --from guided-diffusion
      restore convert edm-cifar10-32x32-uncond-vp.pkl edm-cifar10-ddpmpp.safetensors --from edm-pkl
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def models(as_json: bool) -> None:
    """List the bundled model checkpoints."""
    from restore.engine.checkpoints import list_models

    rows = list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no bundled models; pass a checkpoint file with --model (see `restore convert`)", err=True)
        return
    for row in rows:
        flag = "" if row["available"] else "  (file missing)"
        click.echo(f"{row['name']:<24} {row['purpose']:<12} {row['description']}{flag}")


@main.command()
@click.argument("input_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--operator", "operator_spec", required=True, metavar="SPEC",
              help="Degradation, e.g. jpeg:quality=10, box:size=16, down:factor=4,kernel=bicubic.")
@click.option("--method", required=True, metavar="NAME", help="Restoration method (see `restore methods`).")
@click.option("--nfe", type=click.IntRange(min=1), default=None, help="Network evaluations; default: the method's.")
@click.option("--model", default=None, metavar="NAME|PATH",
              help="Checkpoint file or bundled model (see `restore models`).")
@click.option("--degrade", is_flag=True,
              help="Inputs are clean: degrade them first (saved in OUTPUT_DIR/degraded) and score against them.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of clean references, matched by image id (extension ignored), for PSNR/SSIM.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images (or tiles) per batch.")
@click.option("--device", default=None, help="torch device; default: cuda if available, else cpu.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Run seed; per-image seeds derive from it and the image id.")
@click.option("--recursive", is_flag=True, help="Also restore images in sub-folders (ids keep relative paths).")
@click.option("--overwrite", is_flag=True, help="Restore every image again, even those OUTPUT_DIR already holds.")
@click.option("--hparam", "hparams", multiple=True, metavar="KEY=VALUE", help="Method hyper-parameter (repeatable).")
@click.option("--tile", type=click.IntRange(min=1), default=None,
              help="Tile side in output pixels for other sizes; default: the model's resolution.")
@click.option("--overlap", type=click.IntRange(min=0), default=None,
              help="Minimum tile overlap in measurement pixels; default: a quarter tile.")
@click.option("--class-labels", default=None, metavar="FILE|INT",
              help="Class labels for a class-conditional model: a CSV with columns file,label (file = image id, "
                   "e.g. sub/cat.png) or one class index for every image.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@acceleration_options
def run(input_dir: Path, output_dir: Path, operator_spec: str, method: str, nfe: int | None, model: str | None,
        degrade: bool, reference: Path | None, batch_size: int, device: str | None, seed: int, recursive: bool,
        overwrite: bool, hparams: tuple[str, ...], tile: int | None, overlap: int | None, class_labels: str | None,
        progress: bool, acceleration) -> None:
    """Restore every image in INPUT_DIR into OUTPUT_DIR (PNGs plus manifest.csv; re-running resumes).

    Images of the model's size are batched; other sizes are restored in overlapping tiles for local
    operators (jpeg, down). Prints a one-line JSON summary on stdout.

    \b
    Examples:
      restore run jpegs/ out/ --operator jpeg:quality=10 --method bcm-jpeg-dc --model bcm.safetensors --nfe 2
      restore run clean/ demo/ --operator box:size=16 --method bcm-inpaint --model bcm.safetensors --degrade --seed 1
      restore run jpegs/ out/ --operator jpeg:quality=20 --method bcm-jpeg --model in64.safetensors --class-labels 207
    """
    import torch

    from restore.app.run import RunError, parse_hparams, run_folder

    def skipped(image_id: str, reason: str) -> None:
        click.echo(f"skipping {image_id}: {reason}", err=True)

    try:
        summary = run_folder(
            input_dir, output_dir, operator=operator_spec, method=method, nfe=nfe, model=model, degrade=degrade,
            reference=reference, batch_size=batch_size, seed=seed, recursive=recursive, overwrite=overwrite,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"), hparams=parse_hparams(hparams),
            tile=tile, overlap=overlap, class_labels=class_labels, progress=progress, on_error=skipped,
            acceleration=acceleration)
    except RunError as e:
        raise click.ClickException(str(e)) from None
    ok = [r for r in summary.rows if r["status"] == "ok"]
    means = {m: sum(float(r[m]) for r in ok) / len(ok) for m in ("psnr", "ssim", "cpsnr", "seconds")
             if ok and all(r[m] != "" for r in ok)}
    click.echo(json.dumps({"restored": len(summary.restored), "skipped": len(summary.skipped),
                           "failed": len(summary.failed), "manifest": str(summary.manifest),
                           "mean": {k: round(v, 4) for k, v in means.items()}}))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def methods(as_json: bool) -> None:
    """List the registered restoration methods (blind or not, operators, model, default NFE)."""
    from restore.methods import list_methods

    rows = list_methods()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no methods registered", err=True)
        return
    for row in rows:
        ops = ",".join(row["operators"]) if isinstance(row["operators"], list) else row["operators"]
        kind = "blind" if row["blind"] else "non-blind"
        grad = "autograd" if row["needs_grad"] else ""
        click.echo(f"{row['name']:<14} {kind:<9} {grad:<8} model={row['model']:<5} nfe={row['default_nfe']:<5} "
                   f"operators={ops:<24} {row['description']}")


@main.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "fmt", required=True,
              help="Upstream format of SRC: bcm-ict (BCM/iCT .pt state dicts) or edm-pkl (NVlabs EDM network "
                   "pickles, read without running them); an unknown name lists the supported ones "
                   "(docs/models.md#upstream-checkpoints).")
@click.option("--wrapper", default=None,
              help="Model wrapper (bcm-ict: bcm or cm, default read off the weights; openai-cm: cm or edm, "
                   "default by file name: edm_* -> edm, cd_*/ct_* -> cm; edm-pkl: edm only).")
@click.option("--resolution", type=int, default=None,
              help="Image resolution of the network (default: the format's; ADM families: the size in the file "
                   "name, else 8 * 2^(levels-1); edm-pkl reads it from the pickle and only checks this value).")
@click.option("--head-channels", type=int, default=None,
              help="Channels per attention head (default: the format's: 64; edm-pkl: DhariwalUNet only).")
@click.option("--schedule", type=click.Choice(["linear", "cosine"]), default=None,
              help="guided-diffusion: discrete VP noise schedule (default: cosine at 64 px, else linear).")
@click.option("--qkv-order", type=click.Choice(["three-heads-dim", "heads-three-dim", "heads-dim-three"]),
              default=None,
              help="guided-diffusion / i2sb: row order of the attention qkv weights (default: heads-three-dim = "
                   "legacy, except three-heads-dim for 64 px guided-diffusion).")
@click.option("--operator", "operator_spec", default=None, metavar="SPEC",
              help="i2sb: the degradation the model restores, e.g. jpeg:quality=10 (default: from options.pkl's "
                   "task where the toolkit has it: jpeg-5/10, sr4x-pool/bicubic, inpaint-center).")
@click.option("--options", "options_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="i2sb: the task's options.pkl (default: next to SRC); read without running code.")
@click.option("--weights", type=click.Choice(["ema", "net"]), default=None,
              help="i2sb: the EMA weights (default, used by upstream sampling) or the raw network.")
@click.option("--fp16", is_flag=True, help="Store weights in float16 (half the size).")
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
def convert(src: Path, dst: Path, fmt: str, wrapper: str | None, resolution: int | None, head_channels: int | None,
            schedule: str | None, qkv_order: str | None, operator_spec: str | None, options_file: Path | None,
            weights: str | None, fp16: bool, force: bool) -> None:
    """Convert an upstream checkpoint SRC into a safetensors checkpoint DST (no code from SRC is ever run)."""
    import torch

    from restore.engine.convert import convert_checkpoint

    if dst.exists() and not force:
        raise click.ClickException(f"{dst} exists; pass --force to overwrite it")
    if dst.resolve() == src.resolve():
        raise click.ClickException("DST must differ from SRC: inputs are never overwritten")
    given = {"wrapper": wrapper, "img_resolution": resolution, "num_head_channels": head_channels,
             "schedule": schedule, "qkv_order": qkv_order, "operator": operator_spec, "options": options_file,
             "weights": weights}
    try:
        out = convert_checkpoint(src, dst, fmt, dtype=torch.float16 if fp16 else None,
                                 **{k: v for k, v in given.items() if v is not None})
    except (ValueError, RuntimeError, OSError, TypeError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    click.echo(str(out))


if __name__ == "__main__":
    main()
