"""Named locks that hold across processes and, on PostgreSQL, across machines.

A promotion reads the registry's aliases and then moves several of them: two promoters must not
interleave. A file lock serializes the processes of one machine only; once the Dagster daemon, a
CLI on a laptop and a sensor on another node share one MLflow server, the lock has to live where
all of them meet. On PostgreSQL that is a session advisory lock, which the server drops by itself
when the holder's connection ends, so a promoter that crashes cannot wedge the registry. On SQLite
(one machine by construction) it is a file lock beside the database file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from cxr_platform.errors import CxrError


class LockError(CxrError):
    pass


class LockTimeoutError(LockError):
    """Another holder kept the lock longer than the caller was willing to wait."""


LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE when lock_timeout ends a wait


def advisory_key(name: str) -> int:
    """The lock's name as PostgreSQL's 64-bit advisory lock key (stable across machines)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def lock_file_for(url: str, name: str) -> Path | None:
    """Where a SQLite lock URL keeps the named lock's file; None for an in-memory database."""
    database = sa.engine.make_url(url).database
    if not database or database == ":memory:":
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return Path(database).with_name(f"{Path(database).name}.{safe}.lock")


@contextlib.contextmanager
def exclusive(url: str, name: str, *, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the lock ``name`` in the database at ``url`` for the body of the ``with``."""
    dialect = sa.engine.make_url(url).get_backend_name()
    if dialect == "postgresql":
        with _advisory_lock(url, name, timeout_s):
            yield
    elif dialect == "sqlite":
        path = lock_file_for(url, name)
        if path is None:  # an in-memory database lives in one process: nothing to serialize
            yield
        else:
            with file_lock(path, name, timeout_s=timeout_s):
                yield
    else:
        raise LockError(
            f"locks need PostgreSQL or SQLite, not {dialect!r} (CXR_LOCK_URL names the database)"
        )


@contextlib.contextmanager
def _advisory_lock(url: str, name: str, timeout_s: float | None) -> Iterator[None]:
    key = advisory_key(name)
    # Its own connection, never pooled: the lock belongs to the session, and closing the
    # connection must end it.
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        try:
            connection = engine.connect()
        except sa.exc.OperationalError as exc:
            where = sa.engine.make_url(url).render_as_string(hide_password=True)
            raise LockError(f"cannot reach the lock database {where}: {exc.orig}") from exc
        with connection:
            if timeout_s is not None:
                milliseconds = max(1, int(timeout_s * 1000))
                connection.execute(sa.text(f"SET lock_timeout = {milliseconds}"))
            try:
                # Waiting in the server queues promoters in order and shows them in pg_locks.
                connection.execute(sa.select(sa.func.pg_advisory_lock(key)))
            except sa.exc.OperationalError as exc:
                if getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE:
                    raise LockTimeoutError(
                        f"lock {name!r} still held by another session after {timeout_s}s"
                    ) from exc
                raise
            connection.commit()  # the lock is held by the session, not a transaction
            try:
                yield
            finally:
                connection.execute(sa.select(sa.func.pg_advisory_unlock(key)))
                connection.commit()
    finally:
        engine.dispose()


@contextlib.contextmanager
def file_lock(path: Path, name: str, *, timeout_s: float | None = None) -> Iterator[None]:
    """An exclusive lock on ``path``, for the processes of one machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:

        def try_lock() -> bool:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        if timeout_s is None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        else:  # flock cannot be given a deadline: poll until it
            deadline = time.monotonic() + timeout_s
            delay = 0.05
            while not try_lock():
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(f"lock {name!r} still held after {timeout_s}s")
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
