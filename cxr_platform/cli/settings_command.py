"""``cxr config``: every setting in force, by section, with its variable."""

from __future__ import annotations

import json

import click

from cxr_platform.cli.group import cli, fail_cleanly, settings_for
from cxr_platform.settings import env_name


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable, by section.")
@click.pass_context
@fail_cleanly
def config_command(ctx: click.Context, as_json: bool) -> None:
    """Show every setting in force, by section, with the variable that sets it.

    What the Dagster code location and every other command read too (secrets masked)."""
    shown = settings_for(ctx).effective()
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    for section, values in shown.items():
        click.echo(f"[{section}]")
        for name, value in values.items():
            click.echo(f"  {env_name(name):<36} {json.dumps(value)}")
