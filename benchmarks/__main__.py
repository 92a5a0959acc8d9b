"""`python -m benchmarks ...` = `restore-bench ...`; the form torchrun needs:
``torchrun --nproc_per_node=2 -m benchmarks run quick --out results/quick``."""

from benchmarks.cli import main

if __name__ == "__main__":
    main(prog_name="restore-bench")
