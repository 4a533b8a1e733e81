"""Named locks: a file lock beside a SQLite database, an advisory lock in a real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cxr_platform.locks import LockError, LockTimeoutError, exclusive, lock_file_for
from cxr_platform.ports import free_port

HOLD_UNTIL_KILLED = """
import sys, time
from cxr_platform.locks import exclusive
with exclusive(sys.argv[1], "promotion"):
    print("held", flush=True)
    time.sleep(600)
"""


def _lock_urls(tmp_path, postgres_url) -> list[str]:
    return [f"sqlite:///{tmp_path / 'inference_log.db'}", postgres_url]


def test_a_second_holder_waits_and_a_deadline_ends_the_wait(tmp_path, postgres_url):
    for url in _lock_urls(tmp_path, postgres_url):
        with exclusive(url, "promotion"):
            started = time.monotonic()
            with (
                pytest.raises(LockTimeoutError, match="promotion"),
                exclusive(url, "promotion", timeout_s=0.5),
            ):
                pass
            assert time.monotonic() - started >= 0.4, url
            with exclusive(url, "another lock", timeout_s=0.5):  # names do not collide
                pass
        with exclusive(url, "promotion", timeout_s=0.5):  # free again once released
            pass


def test_a_holder_that_dies_releases_the_lock(tmp_path, postgres_url):
    """A promoter killed mid-promotion must not wedge the registry for everyone else."""
    for url in _lock_urls(tmp_path, postgres_url):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_UNTIL_KILLED, url],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeoutError), exclusive(url, "promotion", timeout_s=0.3):
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        with exclusive(url, "promotion", timeout_s=10):
            pass


def test_the_sqlite_lock_lives_beside_the_database_and_other_databases_are_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'inference_log.db'}"
    assert lock_file_for(url, "cxr.registry.aliases.model/a") == (
        tmp_path / "inference_log.db.cxr.registry.aliases.model_a.lock"
    )
    assert lock_file_for("sqlite://", "x") is None
    with (
        pytest.raises(LockError, match="PostgreSQL or SQLite"),
        exclusive("mysql://user@host/db", "x"),
    ):
        pass


def test_an_unreachable_lock_database_is_one_clear_error():
    url = f"postgresql+psycopg://cxr:s3cret@127.0.0.1:{free_port()}/cxr"
    with (
        pytest.raises(LockError, match="cannot reach the lock database") as raised,
        exclusive(url, "promotion"),
    ):
        pass
    assert "s3cret" not in str(raised.value)
