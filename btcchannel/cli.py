"""The ``btcchannel`` command line."""

import click


@click.group()
def main() -> None:
    """Unidirectional Bitcoin payment channels."""
