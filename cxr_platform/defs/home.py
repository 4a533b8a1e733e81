"""The Dagster instance folder under the platform's home: SQLite storage there, or the
PostgreSQL database the settings name. The CLI and the demo record their runs and events in it,
so `dagster dev` over the same folder shows them."""

from __future__ import annotations

import json
from pathlib import Path

from cxr_platform.errors import CxrError
from cxr_platform.settings import CxrSettings

WRITTEN_BY_CXR = "# Written by `cxr`"
DAGSTER_YAML = f"""\
{WRITTEN_BY_CXR}: local Dagster storage lives in this folder (SQLite).
telemetry:
  enabled: false
"""
DAGSTER_POSTGRES_YAML = """\
{written_by} from CXR_DAGSTER_POSTGRES_URL: runs, events and schedules in PostgreSQL.
storage:
  postgres:
    postgres_url: {url}
telemetry:
  enabled: false
"""


def prepare_dagster_home(settings: CxrSettings) -> Path:
    """Create the home folder and a Dagster instance folder that `dagster dev` can share: its
    storage SQLite in that folder, or the PostgreSQL database the settings name. A dagster.yaml
    someone wrote by hand is left as it is."""
    layout = settings.dagster
    layout.ensure_dirs()
    config = layout.dagster_home / "dagster.yaml"
    wanted = DAGSTER_YAML
    if layout.dagster_postgres_url:
        driver = layout.dagster_postgres_url.split("://", 1)[0]
        if driver != "postgresql+psycopg2":
            # SQLAlchemy 2.1 maps postgresql:// to psycopg 3, on which Dagster's event log
            # fails (it sends NOTIFY with psycopg2's client-side parameters).
            raise CxrError(
                f"CXR_DAGSTER_POSTGRES_URL must name the psycopg2 driver "
                f"(postgresql+psycopg2://user@host:port/db), not {driver}://"
            )
        # A JSON string is a YAML string, quoted whatever the URL holds.
        url = json.dumps(layout.dagster_postgres_url)
        wanted = DAGSTER_POSTGRES_YAML.format(written_by=WRITTEN_BY_CXR, url=url)
    if not config.exists() or (
        config.read_text().startswith(WRITTEN_BY_CXR) and config.read_text() != wanted
    ):
        config.write_text(wanted)
        config.chmod(0o600)  # the URL may carry a password
    return layout.dagster_home
