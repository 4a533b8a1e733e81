"""Every health check in deploy/compose.yaml and every probe in deploy/kubernetes/, run for real.

Each component is started here as a local process with the environment those files give it
(the node with its allow-list, the service with its API key, Orthanc with the shipped
configuration and scripts, the MLflow server with its command line, ...). Only addresses
change: a store another container would be (PostgreSQL, S3, the registry) is a local one, and
a container port is a free local port. Then the check's own command (or the probe's request)
runs against it and must pass, and must fail once the component is stopped. A check that cannot
pass fails here, not in a hospital's cluster.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import pytest
import yaml

from cxr_platform.ports import free_port
from cxr_platform.settings import load_settings

from ..conftest import REPO_ROOT
from ..orthanc import DICOMWEB_PLUGIN, orthanc_binary
from ..postgres import throwaway_postgres
from ..servers import S3_CREDENTIALS, s3_server, stop_process_group, wait_until
from .test_deploy_files import COMPOSE, DEPLOY, _documents, interpolate

# The secrets deploy/.env would hold, and what the Secret `cxr-platform-env` holds
# (config.yaml lists its keys), as a site sets them.
SECRETS = {
    "POSTGRES_USER": "cxr",
    "POSTGRES_PASSWORD": "pg-2b7c19e4d0a8",
    "S3_ACCESS_KEY": "cxr",
    "S3_SECRET_KEY": "s3-5e1f0c7a9b3d",
    "ORTHANC_ADMIN_PASSWORD": "orthanc-8d2e4f6a1c3b",
    "ORTHANC_READER_PASSWORD": "orthanc-reader-3b5d7f9a",
    "CXR_SERVICE_API_KEY": "service-4a9c2e7f1b0d",
    "CXR_UID_SALT": "9f" * 32,
    "VIEWER_TLS_DIR": "/etc/hospital/viewer-tls",  # not a secret: where its files are
}
KUBERNETES_SECRET = {
    "PGPASSWORD": SECRETS["POSTGRES_PASSWORD"],
    "CXR_SERVICE_API_KEY": SECRETS["CXR_SERVICE_API_KEY"],
    "CXR_UID_SALT": SECRETS["CXR_UID_SALT"],
    "CXR_DICOM_WEB_KEYS": "ORTHANC=stow-6c1d8e2a4f7b",
}
# Compose services and Kubernetes workloads, by the component that answers their checks.
COMPONENTS = {
    "postgres": "postgres",
    "mlflow": "mlflow",
    "dagster-webserver": "dagster-webserver",
    "service": "service",
    "cxr-service": "service",
    "dicom-node": "dicom-node",
    "cxr-dicom-node": "dicom-node",
    "orthanc": "orthanc",
    "viewer": "viewer",
    "cxr-viewer": "viewer",
}
# Checks no local process can answer, each with the reason.
NOT_RUN_HERE = {
    "compose:s3": "MinIO and its `mc` client install from neither Debian nor PyPI",
}
# Where a container's command finds its programs: the platform's, then PostgreSQL's.
PATH = os.pathsep.join(
    [
        str(Path(sys.executable).parent),
        *sorted(glob.glob("/usr/lib/postgresql/*/bin")),
        os.environ["PATH"],
    ]
)


@dataclass(frozen=True)
class Check:
    """One health check or probe: a command run in the container, or a request to a port."""

    where: str  # compose:<service> or kubernetes:<workload>:<probe>
    component: str
    command: tuple[str, ...] = ()
    shell: bool = False
    http_path: str | None = None
    https: bool = False  # the probe asks over TLS (the kubelet does not verify the certificate)
    tcp: bool = False
    port: int | None = None  # the container port it asks (a request, or named in a command)
    env: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def run(self, ports: dict[int, int], timeout: float = 30) -> subprocess.CompletedProcess:
        """The check against local processes, ``ports`` mapping container ports to theirs."""
        if self.command:
            text = [
                re.sub(r"localhost:(\d+)", lambda m: f"localhost:{ports[int(m[1])]}", part)
                for part in self.command
            ]
            argv = ["sh", "-c", text[0]] if self.shell else text
            env = {**os.environ, **self.env, "PATH": PATH}
            try:
                return subprocess.run(
                    argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired:
                return subprocess.CompletedProcess(argv, 124, "", "timed out")
        assert self.port is not None
        local = ports[self.port]
        try:
            if self.tcp:
                with socket.create_connection(("127.0.0.1", local), timeout=timeout):
                    return subprocess.CompletedProcess(["tcp", str(local)], 0, "open", "")
            # What the kubelet accepts: any status from 200 to 399.
            scheme = "https" if self.https else "http"
            answer = httpx.get(
                f"{scheme}://127.0.0.1:{local}{self.http_path}", timeout=timeout, verify=False
            )
            ok = 200 <= answer.status_code < 400
            return subprocess.CompletedProcess(["GET"], 0 if ok else 1, str(answer.status_code), "")
        except (OSError, httpx.HTTPError) as exc:
            return subprocess.CompletedProcess(["connect"], 1, "", str(exc))


def _compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), SECRETS))


def compose_checks() -> list[Check]:
    checks = []
    for name, service in _compose()["services"].items():
        test = (service.get("healthcheck") or {}).get("test")
        if not test:
            continue
        kind, *command = test
        assert kind in ("CMD", "CMD-SHELL"), f"{name}: {kind}"
        ports = re.findall(r"localhost:(\d+)", " ".join(command))
        checks.append(
            Check(
                where=f"compose:{name}",
                component=COMPONENTS.get(name, name),
                command=tuple(command),
                shell=kind == "CMD-SHELL",
                port=int(ports[0]) if ports else None,
                env={k: str(v) for k, v in (service.get("environment") or {}).items()},
            )
        )
    return checks


def kubernetes_checks() -> list[Check]:
    documents = _documents()
    config = documents[("ConfigMap", "cxr-platform-config")]["data"]
    checks = []
    for (kind, name), document in documents.items():
        if kind not in ("Deployment", "StatefulSet"):
            continue
        for container in document["spec"]["template"]["spec"]["containers"]:
            named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            env = _container_environment(container, config)
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                spec = container.get(probe)
                if spec is None:
                    continue
                where, component = f"kubernetes:{name}:{probe}", COMPONENTS[name]
                if "exec" in spec:
                    check = Check(where, component, command=tuple(spec["exec"]["command"]), env=env)
                elif "httpGet" in spec:
                    port = spec["httpGet"]["port"]
                    port = named[port] if isinstance(port, str) else port
                    check = Check(
                        where,
                        component,
                        http_path=spec["httpGet"]["path"],
                        https=spec["httpGet"].get("scheme") == "HTTPS",
                        port=port,
                        env=env,
                    )
                else:
                    port = spec["tcpSocket"]["port"]
                    port = named[port] if isinstance(port, str) else port
                    check = Check(where, component, tcp=True, port=port, env=env)
                checks.append(check)
    return checks


def _container_environment(container: dict, config: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config if "configMapRef" in source else KUBERNETES_SECRET)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "configMapKeyRef" in item["valueFrom"]:
            key = item["valueFrom"]["configMapKeyRef"]["key"]
            if key in config:
                env[item["name"]] = config[key]
        else:
            env[item["name"]] = KUBERNETES_SECRET.get(item["valueFrom"]["secretKeyRef"]["key"], "")
    return env


ALL_CHECKS = compose_checks() + kubernetes_checks()


def test_every_check_in_the_deployment_files_is_run_by_a_test_here():
    components = {check.component for check in ALL_CHECKS if check.where not in NOT_RUN_HERE}
    assert components <= set(STARTERS), components - set(STARTERS)
    assert {check.where for check in ALL_CHECKS} >= set(NOT_RUN_HERE)
    # Both files are read: the node's probe is in each.
    assert {"compose:dicom-node", "kubernetes:cxr-dicom-node:livenessProbe"} <= {
        check.where for check in ALL_CHECKS
    }


# -- the components, each started as its deployment starts it -------------------------------------


@dataclass
class Running:
    ports: dict[int, int]  # container port -> local port
    stop: Callable[[], None]


Starter = Callable[[Check, Path, pytest.FixtureRequest], contextlib.AbstractContextManager[Running]]


# Stores other containers would be: locally, the home's own (SQLite registry, log, Dagster).
STORES_ELSEWHERE = (
    "CXR_MLFLOW_TRACKING_URI", "CXR_INFERENCE_LOG_URL", "CXR_DAGSTER_POSTGRES_URL", "DAGSTER_HOME",
)  # fmt: skip


def _local_platform_env(env: dict[str, str], home: Path) -> dict[str, str]:
    """The platform's environment from a deployment file, its stores the home's own."""
    local = {name: value for name, value in env.items() if name not in STORES_ELSEWHERE}
    local["CXR_HOME"] = str(home)
    return local


@contextlib.contextmanager
def _process(
    argv: list[str], env: dict[str, str], log: Path, cwd: Path = REPO_ROOT
) -> Iterator[subprocess.Popen]:
    with log.open("ab") as output:
        process = subprocess.Popen(
            argv,
            env={**os.environ, **env, "PATH": PATH},
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop_process_group(process)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def start_dicom_node(check: Check, folder: Path, request) -> Iterator[Running]:
    dimse, stow = free_port(), free_port()
    env = _local_platform_env(check.env, folder / "home")
    env["CXR_DICOM_PORT"] = str(dimse)
    if "CXR_DICOM_WEB_PORT" in env:
        env["CXR_DICOM_WEB_PORT"] = str(stow)
    # Everything the probe reads comes from the same environment as the node's.
    check.env.update({"CXR_DICOM_PORT": str(dimse), "CXR_HOME": env["CXR_HOME"]})
    log = folder / "node.log"
    with _process([sys.executable, "-m", "cxr_platform.cli", "dicom-node"], env, log) as process:
        wait_until(lambda: _listening(dimse), process, log, "the DICOM node", 120)
        yield Running({11112: dimse, 8443: stow}, lambda: stop_process_group(process))


@contextlib.contextmanager
def start_service(check: Check, folder: Path, request) -> Iterator[Running]:
    from cxr_platform.deployment.pipeline import register_exported, registry_for
    from cxr_platform.serving.process import ServiceProcess

    from .conftest import export_for_registry

    home = folder / "home"
    settings = load_settings(home=home)
    trained = request.getfixturevalue("trained_checkpoint")
    cache = request.getfixturevalue("learnable_cache")
    exported = export_for_registry(settings, trained, cache, folder / "export", "good")
    version = register_exported(settings.registry, exported, triggered_by="test", shadow=False)
    registry_for(settings.registry).promote(version.version, triggered_by="test")
    env = _local_platform_env(check.env, home)
    port = free_port()
    service = ServiceProcess(env=env, port=port, log_path=folder / "service.log").start()
    try:
        yield Running({3000: port}, service.stop)
    finally:
        service.stop()


@contextlib.contextmanager
def start_mlflow(check: Check, folder: Path, request) -> Iterator[Running]:
    """`mlflow server` with the command line compose gives it (Kubernetes gives the same, with
    the store's URL in MLFLOW_BACKEND_STORE_URI), on a local PostgreSQL and S3 store: only the
    host of each changes."""
    import sqlalchemy as sa

    port = free_port()
    service = _compose()["services"]["mlflow"]
    with (
        throwaway_postgres() as server,
        s3_server(folder, buckets=("mlflow", "cxr-mlflow")) as s3,
    ):
        user = SECRETS["POSTGRES_USER"]
        engine = sa.create_engine(server, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sa.text(f'CREATE ROLE "{user}" LOGIN'))
            connection.execute(sa.text(f'CREATE DATABASE mlflow OWNER "{user}"'))
        engine.dispose()
        address = sa.engine.make_url(server)
        if check.where.startswith("compose:"):
            command = ["mlflow", *service["command"]]
            env = {k: str(v) for k, v in service["environment"].items()}
        else:
            (container,) = _documents()[("Deployment", "mlflow")]["spec"]["template"]["spec"][
                "containers"
            ]
            command = [*container["command"], *container["args"]]
            env = dict(check.env)
        local = f"@{address.host}:{address.port}/"
        argv = []
        for part in command:
            part = re.sub(r"@postgres[^/]*:5432/", local, part)
            part = re.sub(r"^--port=\d+$", f"--port={port}", part)
            argv.append(part.replace("--host=0.0.0.0", "--host=127.0.0.1"))
        env = {k: re.sub(r"@postgres[^/]*:5432/", local, v) for k, v in env.items()}
        env.update({"MLFLOW_S3_ENDPOINT_URL": s3.endpoint, **S3_CREDENTIALS})
        log = folder / "mlflow.log"
        with _process(argv, env, log) as process:
            url = f"http://127.0.0.1:{port}/health"
            wait_until(
                lambda: httpx.get(url, timeout=2).status_code == 200, process, log, "MLflow", 180
            )
            yield Running({5000: port}, lambda: stop_process_group(process))


@contextlib.contextmanager
def start_postgres(check: Check, folder: Path, request) -> Iterator[Running]:
    """A PostgreSQL server; the check finds it where the postgres image's own would be found
    (PGHOST and PGPORT stand for the container's default socket)."""
    import sqlalchemy as sa

    stack = contextlib.ExitStack()
    server = stack.enter_context(throwaway_postgres())
    address = sa.engine.make_url(server)
    user = check.env["POSTGRES_USER"]
    engine = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE ROLE "{user}" LOGIN'))
    engine.dispose()
    check.env.update({"PGHOST": address.host, "PGPORT": str(address.port)})
    try:
        yield Running({}, stack.close)
    finally:
        stack.close()


def _orthanc_config(folder: Path, http: int, dicom: int) -> Path:
    """The shipped orthanc.json, its folders and ports made local, its scripts the shipped ones."""
    config = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    storage = folder / "storage"
    config.update(
        {
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": http,
            "DicomPort": dicom,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "LuaScripts": [
                str(DEPLOY / "orthanc" / Path(script).name) for script in config["LuaScripts"]
            ],
        }
    )
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    return path


@contextlib.contextmanager
def start_orthanc(check: Check, folder: Path, request) -> Iterator[Running]:
    """Debian's Orthanc with the shipped orthanc.json and Lua scripts, and its DICOMweb plugin
    (compose switches it on), with the environment compose gives it."""
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (.ci/run installs it)")
    http, dicom = free_port(), free_port()
    path = _orthanc_config(folder, http, dicom)
    log = folder / "orthanc.log"
    with _process([orthanc_binary(), str(path)], check.env, log, cwd=folder) as process:
        wait_until(lambda: _listening(http), process, log, "Orthanc", 60)
        yield Running({8042: http, 4242: dicom}, lambda: stop_process_group(process))


@contextlib.contextmanager
def start_viewer(check: Check, folder: Path, request) -> Iterator[Running]:
    from cxr_platform.pacs.viewer import ViewerServer

    from ..pacs.conftest import self_signed, viewer_dist

    dist = viewer_dist()
    port = free_port()
    pacs = check.env.get("CXR_VIEWER_PACS_URL", "http://orthanc:8042")
    # The certificate and key a deployment mounts where CXR_VIEWER_TLS_* point: one made here.
    assert check.env["CXR_VIEWER_TLS_CERT"] and check.env["CXR_VIEWER_TLS_KEY"]
    cert, key = self_signed(folder)
    section = replace(
        load_settings(home=folder / "home").viewer,
        viewer_port=port,
        viewer_host="127.0.0.1",
        viewer_tls_cert=cert,
        viewer_tls_key=key,
    )
    # nginx resolves the PACS's name when it starts; a name only a cluster knows stands here
    # for this machine, as the viewer's own tests do.
    host = re.sub(r"//[^:/]+", "//127.0.0.1", pacs)
    viewer = ViewerServer(replace(section, viewer_pacs_url=host), folder / "viewer", dist=dist)
    viewer.start()
    try:
        yield Running({8080: port}, viewer.stop)
    finally:
        viewer.stop()


@contextlib.contextmanager
def start_dagster_webserver(check: Check, folder: Path, request) -> Iterator[Running]:
    port = free_port()
    service = _compose()["services"]["dagster-webserver"]
    env = _local_platform_env(check.env, folder / "home")
    env["DAGSTER_HOME"] = str(folder / "dagster")
    (folder / "dagster").mkdir()
    argv = [service["entrypoint"][0], *service["command"]]
    argv = [str(port) if a == "3000" else a for a in argv]
    argv = ["127.0.0.1" if a == "0.0.0.0" else a for a in argv]
    argv = [str(REPO_ROOT / "workspace.yaml") if a.endswith("workspace.yaml") else a for a in argv]
    log = folder / "dagster.log"
    with _process(argv, env, log) as process:
        url = f"http://127.0.0.1:{port}/server_info"
        wait_until(
            lambda: httpx.get(url, timeout=2).status_code == 200, process, log, "Dagster", 240
        )
        yield Running({3000: port}, lambda: stop_process_group(process))


STARTERS: dict[str, Starter] = {
    "dicom-node": start_dicom_node,
    "service": start_service,
    "mlflow": start_mlflow,
    "postgres": start_postgres,
    "orthanc": start_orthanc,
    "viewer": start_viewer,
    "dagster-webserver": start_dagster_webserver,
}


def _checks_of(component: str) -> list[Check]:
    return [c for c in ALL_CHECKS if c.component == component and c.where not in NOT_RUN_HERE]


@pytest.mark.parametrize("component", sorted(STARTERS))
def test_each_check_passes_on_the_running_component_and_fails_once_it_stops(
    component, tmp_path, request
):
    checks = _checks_of(component)
    assert checks, f"no check reads {component}"
    for check in checks:
        # Each check runs against the component started with that file's own environment.
        folder = tmp_path / check.where.replace(":", "-")
        folder.mkdir()
        check = replace(check, env=dict(check.env))
        with STARTERS[component](check, folder, request) as running:
            passed = _eventually(check, running.ports)
            assert passed.returncode == 0, (check.where, passed.stdout, passed.stderr)
            running.stop()
            failed = check.run(running.ports, timeout=5)
            assert failed.returncode != 0, (check.where, "passes with nothing running")


def _eventually(
    check: Check, ports: dict[int, int], timeout: float = 60
) -> subprocess.CompletedProcess:
    """A check's result once the component has had its start-up time (the files give each
    check retries and an initial delay for that)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check.run(ports)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(1)


@pytest.mark.parametrize("account", ["admin", "reader"])
def test_orthanc_refuses_to_run_without_a_password(tmp_path, account):
    """The shipped configuration reads each account's password from the environment; unset,
    Orthanc would take an empty one, so the shipped script stops it instead, naming it."""
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (.ci/run installs it)")
    path = _orthanc_config(tmp_path, free_port(), free_port())
    unset = f"ORTHANC_{account.upper()}_PASSWORD"
    env = {**os.environ, **{k: v for k, v in SECRETS.items() if k.startswith("ORTHANC_")}}
    env.pop(unset)
    stopped = subprocess.run(
        [orthanc_binary(), str(path)], env=env, capture_output=True, text=True, timeout=60
    )
    said = stopped.stderr + stopped.stdout
    assert f"placeholder credential in RegisteredUsers/{account}" in said, said[-2000:]
    assert "Orthanc has stopped" in said
