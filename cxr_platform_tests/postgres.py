"""A real, throw-away PostgreSQL server for tests (Debian's postgresql package).

initdb refuses to run as root, so under root the cluster belongs to the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cxr_platform.ports import free_port


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _as_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def temporary_postgres(base: Path) -> Iterator[str]:
    """Yield a SQLAlchemy URL of a fresh database; the server is stopped and removed after."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl):
        raise RuntimeError("PostgreSQL is not installed (.ci/run installs the postgresql package)")
    data = base / "pgdata"
    sockets = base / "pgsock"
    for folder in (data, sockets):
        folder.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        for folder in (data, sockets):
            shutil.chown(folder, "postgres")
    subprocess.run(
        _as_owner([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    port = free_port()
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_owner(
            [pg_ctl, "-D", str(data), "-o", options, "-w", "-l", str(base / "pg.log"), "start"]
        ),
        check=True,
        capture_output=True,
    )
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        import sqlalchemy as sa

        while True:
            try:
                with sa.create_engine(url).connect():
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        subprocess.run(
            _as_owner([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
        )


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """:func:`temporary_postgres` in a folder of its own, removed after. Not under pytest's tmp
    folder: that is private to root, and the server runs as postgres."""
    base = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
    try:
        with temporary_postgres(base) as url:
            yield url
    finally:
        shutil.rmtree(base, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``server_url``; its URL."""
    import sqlalchemy as sa

    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return str(sa.engine.make_url(server_url).set(database=name).render_as_string(False))
