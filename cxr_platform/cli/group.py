"""The ``cxr`` group and what every command shares: settings with a command's flags on top,
typed errors as one line and an exit code, and the options several commands take."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import click
from pydantic import ValidationError
from pydantic_settings import SettingsError

from cxr_platform.errors import CxrError
from cxr_platform.redaction import withhold_logged_values
from cxr_platform.settings import CxrSettings, env_name, load_settings
from cxr_platform.terminal import attached

EXIT_USAGE = 2
EXIT_CHECKS_FAILED = 3


class LazyChoice(click.Choice):
    """A choice among names the library registers, looked up only when an option is used, so
    `cxr --help` does not import torch to list the architectures."""

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        super().__init__(())
        self._names = names

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return tuple(self._names())

    @choices.setter
    def choices(self, value: object) -> None:
        pass  # click's constructor assigns the (empty) eager list; the names come from _names


def architecture_names() -> tuple[str, ...]:
    from cxr_platform.models.zoo import ARCHITECTURES

    return tuple(ARCHITECTURES)


def _settings_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        where = f"{name} ({env_name(name)})" if name else "settings"
        problems.append(f"{where}: {error['msg']}")
    return "invalid settings: " + "; ".join(problems)


def fail_cleanly(command):
    """Typed platform errors and invalid settings become one clear line on stderr and a
    non-zero exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CxrError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(EXIT_USAGE)
        except ValidationError as exc:
            click.secho(f"error: {_settings_error(exc)}", fg="red", err=True)
            sys.exit(EXIT_USAGE)
        except SettingsError as exc:  # a secret's file could not be read
            click.secho(f"error: invalid settings: {exc}", fg="red", err=True)
            sys.exit(EXIT_USAGE)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for all local state (default: $CXR_HOME or ./.cxr).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, verbose: bool) -> None:
    """cxr_platform: chest X-ray Normal/Pneumonia classifier, from data to PACS."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    withhold_logged_values()  # every command's log, the node's and the trial's included
    ctx.obj = {"home": home, "verbose": verbose}
    # Steps Dagster runs in this process have their stderr captured; bars still reach a person.
    ctx.with_resource(attached())


def settings_for(ctx: click.Context, **overrides: object) -> CxrSettings:
    """The environment's settings with this command's flags on top (flags win)."""
    return load_settings(home=ctx.obj.get("home"), **overrides)


DATA_OPTION = click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Data folder (default: $CXR_DATA_DIR, else the synthetic set).",
)


WORKERS_OPTION = click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Parallel decode workers."
)


def number_text(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"
