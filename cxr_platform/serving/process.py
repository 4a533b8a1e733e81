"""Run the service as ``bentoml serve`` in a child process: for ``cxr serve``, tests and benchmarks.

Settings reach the service through ``CXR_*`` environment variables, the same way an operator
configures a deployed service.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

from cxr_platform.errors import CxrError
from cxr_platform.ports import free_port

SERVICE_TARGET = "cxr_platform.serving.service:CxrService"
REPO_ROOT = Path(__file__).resolve().parents[2]


class ServiceStartError(CxrError):
    pass


def serve_command(port: int, host: str = "127.0.0.1", target: str = SERVICE_TARGET) -> list[str]:
    """``target``: the service's import path, or a Bento tag from the BentoML store."""
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        target,
        "--host",
        host,
        "--port",
        str(port),
    ]


def service_environment(overrides: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    env.update(overrides or {})
    return env


class ServiceProcess:
    """``with ServiceProcess(env={...}) as service:`` starts the service and waits until
    ``/readyz`` answers 200 (a production model is loaded); leaving stops it. ``command``
    replaces ``bentoml serve`` (e.g. ``cxr serve``); it must listen on ``port``."""

    def __init__(
        self,
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 180.0,
        target: str = SERVICE_TARGET,
        command: list[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.command = command or serve_command(self.port, target=target)
        self.env = service_environment(env)
        self._own_home: str | None = None
        if "BENTOML_HOME" not in (env or {}) and target == SERVICE_TARGET:
            # BentoML clears $BENTOML_HOME/prometheus_multiproc_dir when a service starts, so
            # two services sharing the default home wipe each other's /metrics. A service that
            # follows the registry needs nothing else from that home.
            self._own_home = tempfile.mkdtemp(prefix="cxr-bentoml-")
            self.env["BENTOML_HOME"] = self._own_home
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        output: int | IO[bytes] = subprocess.DEVNULL
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            output = self._log_file
        self.process = subprocess.Popen(
            self.command,
            cwd=REPO_ROOT,
            env=self.env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers share a process group we can signal
        )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServiceStartError(
                    f"the service exited with code {self.process.returncode} while starting"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServiceStartError(f"the service was not ready within {self.ready_timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_home is not None:
            shutil.rmtree(self._own_home, ignore_errors=True)
            self._own_home = None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
