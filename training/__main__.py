"""`python -m training` / `torchrun -m training`: the `restore-train` command line."""

from training.cli import main

main(prog_name="restore-train")
