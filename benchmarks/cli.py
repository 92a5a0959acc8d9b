"""`restore-bench` command line: run benchmark suites and turn results into tables and plots."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if out and min(out) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="bcm-restore")
def main() -> None:
    """Benchmark restoration methods: suites x operators x methods x NFE budgets.

    \b
    Example:
      restore-bench generation bcm-cifar10 --out results/bcm-gen --n 1000 --nfe 1,2,3,4
    """


@main.command()
@click.argument("model")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--data", default="cifar10", show_default=True, help="Dataset name or path (see benchmarks.datasets).")
@click.option("--reference-split", default="train", show_default=True, help="Split of --data that FID compares with.")
@click.option("--inversion-split", default="test", show_default=True, help="Split of --data whose images are inverted.")
@click.option("--n", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Samples per NFE, reference images and inverted images.")
@click.option("--nfe", "nfes", default="1,2,3,4", show_default=True, callback=_int_list,
              help="Generation NFE budgets (EDM: odd, 2 Heun steps - 1).")
@click.option("--inversion-nfe", "inversion_nfes", default="1,2", show_default=True, callback=_int_list,
              help="Inversion NFE budgets (EDM: even, 2 per Heun step); empty to skip.")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=250, show_default=True)
def generation(model: str, out: Path, data: str, reference_split: str, inversion_split: str, n: int,
               nfes: list[int], inversion_nfes: list[int], seed: int, batch_size: int) -> None:
    """Generation and inversion quality of MODEL: FID/KID vs NFE, inversion MSE vs NFE, sample grids.

    Writes results.csv (long format), summary.md / summary.json and PNG grids to --out; prints the summary.

    \b
    Example:
      restore-bench generation runs/edm/ema.safetensors --out results/edm-gen --nfe 35 --inversion-nfe 20
    """
    import pandas as pd
    import torch

    from benchmarks.datasets import build_dataset
    from benchmarks.generation import evaluate_generation, evaluate_inversion, image_grid
    from operators.utils import from_uint8
    from restore.checkpoints import load_model
    from restore.io import write_csv_atomic, write_png

    try:
        net = load_model(model)
        reference_set = build_dataset(data, reference_split)
        inverted_set = build_dataset(data, inversion_split)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    out.mkdir(parents=True, exist_ok=True)
    reference = reference_set.get_batch(range(min(n, len(reference_set))))[1]
    rows, samples = evaluate_generation(net, reference, nfes, n=n, seed=seed, batch_size=batch_size)
    for nfe, x in samples.items():
        write_png(image_grid(from_uint8(x[:64]), 8)[None], out / f"samples_nfe{nfe}.png")
    if inversion_nfes:
        images = inverted_set.get_batch(range(min(n, len(inverted_set))))[1]
        inv_rows, recs = evaluate_inversion(net, images, inversion_nfes, seed=seed, batch_size=batch_size)
        rows += inv_rows
        strip = torch.cat([images[:16], *(recs[k][:16] for k in inversion_nfes)])  # rows: input, then per NFE
        write_png(image_grid(strip, 16)[None], out / "inversion.png")

    frame = pd.DataFrame(rows).assign(model=str(model), dataset=data, seed=seed)
    write_csv_atomic(frame, out / "results.csv")
    summary = (frame.groupby(["metric", "nfe"], as_index=False)["value"].mean()
               .pivot(index="nfe", columns="metric", values="value"))
    text = summary.to_markdown(floatfmt=".4g")
    (out / "summary.md").write_text(text + "\n")
    # {metric: {nfe: mean}}: the form model cards take (`restore-train export --metrics`)
    means = {m: {f"{k:g}": round(v, 6) for k, v in col.dropna().items()} for m, col in summary.items()}
    (out / "summary.json").write_text(json.dumps({"n": n, "data": data, **means}, indent=1) + "\n")
    click.echo(text)
    click.echo(json.dumps({"out": str(out), "rows": len(frame)}), err=True)


if __name__ == "__main__":
    main()
