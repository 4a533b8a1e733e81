"""Real servers a shared deployment runs, started by tests on 127.0.0.1: an S3-compatible store
(moto's standalone server) and an MLflow tracking server with a PostgreSQL backend store and its
artifacts in that S3 store (proxied, so clients need no S3 credentials)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from cxr_platform.ports import free_port

# moto accepts any credentials; boto3 and MLflow's S3 client still insist on having some.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def wait_until(ready, process: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    """Until ``ready()`` is true; fails with the process's log when it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError, httpx.HTTPError):
            if ready():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout}s:\n{log.read_text()}")
        time.sleep(0.3)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to a process started with ``start_new_session=True`` and all it started, then
    SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def _process(command: list[str], log: Path, env: dict[str, str] | None = None):
    with log.open("w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class S3Store:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@contextlib.contextmanager
def s3_server(folder: Path, *, buckets: tuple[str, ...] = ()) -> Iterator[S3Store]:
    port = free_port()
    log = folder / "s3.log"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _process(command, log) as process:
        store = S3Store(f"http://127.0.0.1:{port}")
        wait_until(
            lambda: httpx.get(f"{store.endpoint}/moto-api/", timeout=2).status_code == 200,
            process,
            log,
            "the S3 server",
            60,
        )
        for bucket in buckets:
            store.client().create_bucket(Bucket=bucket)
        yield store


@contextlib.contextmanager
def mlflow_server(
    folder: Path, *, backend_store_uri: str, artifacts_destination: str, s3: S3Store
) -> Iterator[str]:
    """An MLflow server; yields its tracking URI."""
    port = free_port()
    log = folder / "mlflow.log"
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", backend_store_uri),
        *("--artifacts-destination", artifacts_destination, "--serve-artifacts"),
    ]
    env = {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    with _process(command, log, env) as process:
        uri = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: httpx.get(f"{uri}/health", timeout=2).status_code == 200,
            process,
            log,
            "the MLflow server",
            180,
        )
        yield uri
