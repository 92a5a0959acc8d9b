"""`restore` command line: restore image folders, list models and methods, convert checkpoints.

Progress goes to stderr, machine-readable results to stdout; user errors exit non-zero with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bcm-restore")
def main() -> None:
    """Zero-shot image restoration with Bidirectional Consistency Models.

    \b
    Examples:
      restore models
      restore convert ema_0.99997_234000.pt bcm-imagenet64.safetensors --from bcm-ict
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def models(as_json: bool) -> None:
    """List the bundled model checkpoints."""
    from restore.checkpoints import list_models

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
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "fmt", type=click.Choice(["bcm-ict"]), required=True,
              help="Upstream format of SRC (bcm-ict: Mosasaur5526/BCM-iCT-torch state dicts).")
@click.option("--wrapper", type=click.Choice(["bcm", "cm"]), default=None,
              help="Model wrapper; default: bcm for bidirectional networks, cm otherwise.")
@click.option("--resolution", default=64, show_default=True, help="Image resolution of the network.")
@click.option("--head-channels", default=64, show_default=True, help="Channels per attention head.")
@click.option("--fp16", is_flag=True, help="Store weights in float16 (half the size).")
@click.option("--force", is_flag=True, help="Overwrite DST if it exists.")
def convert(src: Path, dst: Path, fmt: str, wrapper: str | None, resolution: int, head_channels: int,
            fp16: bool, force: bool) -> None:
    """Convert an upstream checkpoint SRC into a safetensors checkpoint DST (nothing is unpickled)."""
    import torch

    from restore.convert import convert_checkpoint

    if dst.exists() and not force:
        raise click.ClickException(f"{dst} exists; pass --force to overwrite it")
    if dst.resolve() == src.resolve():
        raise click.ClickException("DST must differ from SRC: inputs are never overwritten")
    try:
        out = convert_checkpoint(src, dst, fmt, wrapper=wrapper, img_resolution=resolution,
                                 num_head_channels=head_channels,
                                 dtype=torch.float16 if fp16 else None)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    click.echo(str(out))


if __name__ == "__main__":
    main()
