"""`restore-bench` command line: run benchmark suites and turn results into tables and plots."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bcm-restore")
def main() -> None:
    """Benchmark restoration methods: suites x operators x methods x NFE budgets.

    \b
    Example:
      restore-bench --help
    """


if __name__ == "__main__":
    main()
