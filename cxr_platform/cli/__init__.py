"""The ``cxr`` command: a thin shell over the library and the Dagster definitions, one module
per command group. Importing the package registers every command on the group."""

from cxr_platform.cli import (  # noqa: F401  (each module registers its commands)
    data,
    demo,
    pacs,
    registry,
    scoring,
    settings_command,
    sites,
    training,
    viewer,
)
from cxr_platform.cli.group import cli


def main() -> None:
    cli(prog_name="cxr")
