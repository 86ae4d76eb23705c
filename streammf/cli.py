"""The ``streammf`` command line. Reads settings from the environment once and hands plain objects down."""

from __future__ import annotations

import click

from streammf import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="streammf")
def cli() -> None:
    """streammf: a streaming online matrix-factorisation recommender (Kafka -> SGD -> Redis, WALS refresh)."""


def main() -> None:
    cli()
