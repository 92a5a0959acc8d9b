"""What the toolkit records about its runs and models: provenance (machine, packages, git state) and the
training records the fairness rules compare."""
