"""The deployment files, validated offline: no Docker engine, cluster or helm binary runs here.

- ``deploy/compose.yaml`` against the Compose specification (check-jsonschema's built-in copy);
- the Kubernetes manifests against a current Kubernetes API (kubernetes-validate, strict: an
  unknown field fails);
- the Helm values as YAML, with the structure the Dagster chart reads;
- and what no schema knows: every CXR_* variable they set is a real setting, every file they
  mount or copy exists, the code location they name is importable, and no secret is written
  in them.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxr_platform.settings import env_name, settings_fields

from ..conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"
MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "dagster-values.yaml")
HELM_VALUES = KUBERNETES / "dagster-values.yaml"
VIEWER_DOCKERFILE = DEPLOY / "viewer" / "Dockerfile"
KUBERNETES_VERSION = "1.34.0"  # a current release; the validator ships schemas up to 1.37
SETTINGS = {env_name(name) for name in settings_fields()}


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed (pip install -e '.[dev]')")
    return found


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def test_the_compose_file_follows_the_compose_specification(tmp_path):
    checked = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The validator does reject what the specification forbids (a misspelt service key).
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("healthcheck:", "healthchek:", 1))
    rejected = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken))
    assert rejected.returncode != 0


def test_the_compose_stack_is_complete_and_wired_by_service_name():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name in (
        "postgres", "s3", "mlflow", "dagster-webserver", "dagster-daemon", "service",
        "orthanc", "dicom-node", "viewer",
    ):  # fmt: skip
        assert name in services, name
    for name, service in services.items():
        if service.get("restart") != "no":
            assert "healthcheck" in service or name == "dagster-daemon", f"{name} has no check"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    node = services["dicom-node"]["environment"]
    assert node["CXR_DICOM_DESTINATION"].split("@")[1].split(":")[0] in services
    assert "mlflow" in services["dagster-daemon"]["environment"]["CXR_MLFLOW_TRACKING_URI"]


def test_files_the_compose_file_and_dockerfile_use_exist():
    compose = yaml.safe_load(COMPOSE.read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), source
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), source
    extras = re.search(r'pip install --no-cache-dir "\.\[(\w+)\]"', dockerfile)
    assert extras, "the Dockerfile installs the platform with an extra"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(rf"^{extras.group(1)} = \[", pyproject, re.MULTILINE)


def _deploy_texts() -> dict[str, str]:
    paths = [COMPOSE, DEPLOY / ".env.example", DEPLOY / "Dockerfile", VIEWER_DOCKERFILE]
    paths += list(KUBERNETES.glob("*.yaml"))
    return {path.name: path.read_text() for path in paths}


def test_every_platform_variable_they_set_is_a_real_setting():
    for name, text in _deploy_texts().items():
        # Names set (a YAML key, NAME=value) or substituted (${NAME...}); values like CXR_AI
        # (an AE title) are not variables.
        for variable in set(re.findall(r"\b(CXR_[A-Z0-9_]+)\s*(?:[:=]|:?-)", text)):
            if variable.endswith("_IMAGE"):  # compose's own image variables, not settings
                continue
            assert variable in SETTINGS, f"{name} sets {variable}, which no setting reads"


_SUBSTITUTION = re.compile(r"\$\$|\$\{([A-Za-z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """What compose makes of a value: ${VAR}, ${VAR:-default}, ${VAR:?error} and $$."""

    def value(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        found = env.get(name)
        if operator in (":?", "?") and not found:
            raise LookupError(f"{name}: {argument}")
        if operator in (":-", "-") and not found:
            return argument
        return found or ""

    return _SUBSTITUTION.sub(value, text)


def _example_environment() -> dict[str, str]:
    example = (DEPLOY / ".env.example").read_text()
    return dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", example, re.MULTILINE))


SECRET_NAMES = ("PASSWORD", "SECRET", "_KEY", "SALT")


def is_secret(name: str) -> bool:
    # An S3 access key names the account, like a user name; its secret key is the secret. A
    # TLS key setting names the file that holds the key, mounted from the host or a Secret.
    return (
        any(word in name for word in SECRET_NAMES)
        and "ACCESS_KEY" not in name
        and not name.endswith("TLS_KEY")
    )


def _filled_environment() -> tuple[dict[str, str], set[str]]:
    """deploy/.env as an administrator fills it: every secret a distinctive value, every other
    empty value a placeholder; and the secrets' names."""
    example = _example_environment()
    secrets = {name for name in example if is_secret(name)}
    env = {
        **example,
        **{name: f"/filled/{name.lower()}" for name, value in example.items() if not value},
        **{name: f"sentinel-{name.lower()}-7f3a" for name in secrets},
    }
    return env, secrets


SHELLS = ("/bin/sh", "sh", "/bin/bash", "bash")


def _argvs_as_run(argv: list[str], environment: dict[str, str], work: Path) -> list[list[str]]:
    """The argument vectors the programs of a command really get. A shell's script (``sh -c``,
    a health check's CMD-SHELL) expands variables at run time, which compose's ``$$`` defers
    to: it is run with every word it could call as a program replaced by a stub that records
    what it was given, in the service's environment."""
    if len(argv) < 3 or argv[0] not in SHELLS or argv[1] != "-c":
        return [argv]
    script = argv[2]
    stubs = work / "stubs"
    stubs.mkdir(parents=True, exist_ok=True)
    recorded = work / "argv"
    recorded.write_text("")
    for word in set(re.findall(r"[A-Za-z_][\w.-]*", script)):
        stub = stubs / word
        stub.write_text('#!/bin/sh\n{ printf "%s\\037" "${0##*/}" "$@"; echo; } >> "$ARGV_LOG"\n')
        stub.chmod(0o755)
    subprocess.run(
        ["/bin/sh", "-c", script],
        env={**environment, "PATH": str(stubs), "ARGV_LOG": str(recorded)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    return [line.split("\x1f")[:-1] for line in recorded.read_text().splitlines()]


def _command_lines(service: dict, work: Path) -> list[list[str]]:
    """Every argument vector a service's container would start programs with: its entrypoint
    and command, and its health check."""
    environment = {str(k): str(v) for k, v in (service.get("environment") or {}).items()}

    def listed(value) -> list[str]:
        if value is None:
            return []
        return [value] if isinstance(value, str) else [str(item) for item in value]

    argvs = []
    command = listed(service.get("entrypoint")) + listed(service.get("command"))
    if command:
        argvs += _argvs_as_run(command, environment, work / "command")
    test = listed((service.get("healthcheck") or {}).get("test"))
    if test[:1] == ["CMD-SHELL"]:
        argvs += _argvs_as_run(["/bin/sh", "-c", test[1]], environment, work / "health")
    elif test[:1] == ["CMD"]:
        argvs.append(test[1:])
    return argvs


def test_secrets_never_reach_a_command_line_once_compose_fills_them_in(tmp_path):
    """Every secret, given a distinctive value, appears only in environments (which each
    process reads itself), never in the argument vector of a program a container starts (an
    entrypoint, a command, what a shell script in either calls once it has expanded its
    variables, a health check): those show in `ps` and `docker inspect`."""
    env, secrets = _filled_environment()
    assert {"POSTGRES_PASSWORD", "CXR_SERVICE_API_KEY", "CXR_UID_SALT"} <= secrets
    compose = yaml.safe_load(interpolate(COMPOSE.read_text(), env))
    ran_a_script = False
    for name, service in compose["services"].items():
        argvs = _command_lines(service, tmp_path / name)
        ran_a_script |= any(argv and argv[0] not in SHELLS for argv in argvs[1:])
        text = json.dumps(argvs)
        for secret in secrets:
            assert env[secret] not in text, f"{name}: {secret} is on a command line: {argvs}"
        assert not re.search(r"://[^/\s:@\"]+:[^/\s@\"]+@", text), f"{name}: a URL holds a password"
        for key, value in (service.get("environment") or {}).items():
            if is_secret(key):
                literal = str(value)
                assert literal in env.values() or not literal, f"{name}: {key} is written"
    assert ran_a_script  # the health checks' shell scripts were run, not only read
    assert "change-me" not in COMPOSE.read_text()


def test_nothing_shipped_holds_a_usable_credential():
    """The example leaves every secret empty and compose refuses to start until each is set;
    Orthanc's configuration reads its secrets from the environment."""
    example = _example_environment()
    secrets = [name for name in example if is_secret(name)]
    assert secrets and all(example[name] == "" for name in secrets)
    text = COMPOSE.read_text()
    for name in secrets:
        assert re.search(rf"\$\{{{name}:\?", text), f"compose starts without {name}"
    with pytest.raises(LookupError, match="POSTGRES_PASSWORD"):
        interpolate(text, example)
    orthanc = (DEPLOY / "orthanc" / "orthanc.json").read_text()
    assert "change-me" not in orthanc and "${ORTHANC_ADMIN_PASSWORD}" in orthanc
    for manifest in MANIFESTS:
        for document in yaml.safe_load_all(manifest.read_text()):
            assert document["kind"] != "Secret", f"{manifest.name} writes a Secret"
            # $(VAR) in a container's command or args is expanded onto the command line.
            for container in _containers(document):
                line = json.dumps([container.get("command"), container.get("args")])
                assert "$(" not in line, f"{manifest.name}: {container['name']}"


def _containers(document: dict) -> list[dict]:
    template = document.get("spec", {}).get("template", {})
    return list(template.get("spec", {}).get("containers", []))


def test_the_kubernetes_manifests_validate_against_a_current_api(tmp_path):
    checked = run(
        tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION,
        *map(str, MANIFESTS),
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Strict validation rejects a field the API does not have.
    broken = tmp_path / "service.yaml"
    broken.write_text((KUBERNETES / "service.yaml").read_text().replace("replicas:", "replica:"))
    rejected = run(tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(broken))
    assert rejected.returncode != 0


def _documents() -> dict[tuple[str, str], dict]:
    found = {}
    for manifest in MANIFESTS:
        for document in yaml.safe_load_all(manifest.read_text()):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


def test_the_service_the_node_and_mlflow_are_deployed_as_each_needs():
    documents = _documents()
    service = documents[("Deployment", "cxr-service")]["spec"]["template"]
    (container,) = service["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert service["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    autoscaler = documents[("HorizontalPodAutoscaler", "cxr-service")]["spec"]
    assert autoscaler["scaleTargetRef"]["name"] == "cxr-service"
    assert autoscaler["minReplicas"] >= 2

    node = documents[("StatefulSet", "cxr-dicom-node")]["spec"]
    (claim,) = node["volumeClaimTemplates"]
    (mount,) = node["template"]["spec"]["containers"][0]["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"]
    assert mount["mountPath"] == "/var/lib/cxr/dicom"  # the spool, outbox and ledger persist
    ports = documents[("Service", "cxr-dicom-node")]["spec"]["ports"]
    config = documents[("ConfigMap", "cxr-platform-config")]["data"]
    # DIMSE and STOW-RS, on the ports the node is configured to listen on.
    assert [p["port"] for p in ports] == [
        int(config["CXR_DICOM_PORT"]),
        int(config["CXR_DICOM_WEB_PORT"]),
    ]
    assert "mlflow" in config["CXR_MLFLOW_TRACKING_URI"]
    assert documents[("Service", "mlflow")]["spec"]["ports"][0]["port"] == 5000


def test_the_dagster_helm_values_run_on_ordinary_nodes_and_train_in_gpu_pods():
    """A run orchestrates: it holds no GPU, and training leaves it for a pod of its own (the
    launcher the ConfigMap names), which asks the GPU pool for what it needs."""
    values = yaml.safe_load(HELM_VALUES.read_text())
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    run = launcher["config"]["k8sRunLauncher"]["runK8sConfig"]
    assert "gpu" not in yaml.safe_dump(run).lower()
    assert run["podSpecConfig"]["securityContext"]["fsGroup"] == 10001
    config = _documents()[("ConfigMap", "cxr-platform-config")]["data"]
    assert config["CXR_TRAINING_LAUNCHER"] == "kubernetes"
    assert {"name": "cxr-platform-config"} in launcher["config"]["k8sRunLauncher"]["envConfigMaps"]
    assert values["postgresql"]["enabled"] is False
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    module = args[args.index("--module-name") + 1]
    attribute = args[args.index("--attribute") + 1]
    workspace = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())
    (location,) = workspace["load_from"]
    assert module == location["python_module"]["module_name"]  # the same code location
    assert attribute == location["python_module"]["attribute"]
    assert importlib.util.find_spec(module) is not None


def test_the_run_queue_caps_the_runs_that_pull_from_a_site_archive():
    """The silent trial's job carries the tag the queue limits, by the same key and value."""
    from cxr_platform.defs.definitions import build_definitions
    from cxr_platform.defs.trial_assets import TRIAL_JOB

    values = yaml.safe_load(HELM_VALUES.read_text())
    queue = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    limits = {limit["key"]: limit["limit"] for limit in queue["tagConcurrencyLimits"]}
    tags = build_definitions().resolve_job_def(TRIAL_JOB).tags
    (key,) = [key for key in tags if key in limits]
    assert 1 <= limits[key] < queue["maxConcurrentRuns"]


@pytest.mark.parametrize("path", [DEPLOY / "dagster" / "dagster.yaml", HELM_VALUES])
def test_yaml_files_parse(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_the_viewer_gets_everything_its_server_block_needs_and_reads_orthanc():
    """The nginx image fills the server template from the environment: each name it uses is set
    by the image or by compose and Kubernetes, the certificate and key it serves HTTPS with are
    mounted where those names point, and its probes ask a path the template serves, over
    HTTPS."""
    from cxr_platform.pacs.viewer import server_template_text

    template = server_template_text()
    needed = set(re.findall(r"\$\{([A-Z0-9_]+)\}", template))
    assert {"CXR_VIEWER_PACS_URL", "OHIF_ROOT", "OHIF_APP_CONFIG"} <= needed
    assert {"CXR_VIEWER_TLS_CERT", "CXR_VIEWER_TLS_KEY"} <= needed
    dockerfile = VIEWER_DOCKERFILE.read_text()
    env_block = dockerfile[dockerfile.rindex("ENV ") :]
    from_image = set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", env_block))
    assert "location = /app-config.js" in template

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    viewer = services["viewer"]
    environment = viewer["environment"]
    assert needed <= from_image | set(environment)
    pacs = environment["CXR_VIEWER_PACS_URL"]
    assert pacs.split("//")[1].split(":")[0] == "orthanc" and "orthanc" in viewer["depends_on"]
    assert services["orthanc"]["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    (tls_volume,) = viewer["volumes"]
    mounted = tls_volume.rsplit(":", 2)[1]  # source:target:ro, the source ${VAR:?message}
    for name in ("CXR_VIEWER_TLS_CERT", "CXR_VIEWER_TLS_KEY"):
        assert environment[name].startswith(mounted + "/"), name
    probe = " ".join(viewer["healthcheck"]["test"])
    assert "https://localhost:8080/app-config.js" in probe

    documents = _documents()
    deployment = documents[("Deployment", "cxr-viewer")]["spec"]["template"]["spec"]
    (container,) = deployment["containers"]
    variables = {item["name"]: item for item in container.get("env", [])}
    assert needed <= from_image | set(variables)
    reference = variables["CXR_VIEWER_PACS_URL"]["valueFrom"]["configMapKeyRef"]
    config = documents[("ConfigMap", reference["name"])]["data"]
    assert config[reference["key"]].startswith("http")
    (mount,) = container["volumeMounts"]
    (volume,) = deployment["volumes"]
    assert mount["name"] == volume["name"] and volume["secret"]["secretName"] == "cxr-viewer-tls"
    for name in ("CXR_VIEWER_TLS_CERT", "CXR_VIEWER_TLS_KEY"):
        assert variables[name]["value"].startswith(mount["mountPath"] + "/"), name
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert probe["httpGet"]["path"] == "/app-config.js"
        assert probe["httpGet"]["scheme"] == "HTTPS"
    service = documents[("Service", "cxr-viewer")]["spec"]
    assert service["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert service["ports"][0]["port"] == 443


def test_orthanc_ships_a_reader_account_that_only_reads():
    """Readers log in with their own account, never the administrator's, and the shipped
    filter is loaded (test_viewer_server.py runs it on a real Orthanc)."""
    config = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    users = config["RegisteredUsers"]
    assert set(users) == {"admin", "reader"}
    assert users["reader"] == "${ORTHANC_READER_PASSWORD}" != users["admin"]
    assert "/etc/orthanc/readers-read-only.lua" in config["LuaScripts"]
    assert config["LuaScripts"][0].endswith("refuse-placeholder-credentials.lua")
    orthanc = yaml.safe_load(COMPOSE.read_text())["services"]["orthanc"]
    assert any(v.endswith(":/etc/orthanc/readers-read-only.lua:ro") for v in orthanc["volumes"])
    assert "ORTHANC_READER_PASSWORD" in orthanc["environment"]


def test_every_folder_a_volume_is_mounted_on_belongs_to_the_images_user():
    """An empty named volume takes its owner from the image's folder; one the image lacks is
    made root-owned, and uid 10001 cannot write its spool or Dagster's home there."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\d+)$", dockerfile, re.MULTILINE)
    made = re.search(
        r"useradd --uid (\d+).*?mkdir -p ([^\\&]+).*?chown -R \S+ ([^\n]+)", dockerfile, re.S
    )
    assert made and made.group(1) == user
    created = made.group(2).split()
    owned = made.group(3).split()
    compose = yaml.safe_load(COMPOSE.read_text())
    platform_image = compose["x-platform"]["image"]
    targets = set()
    for service in compose["services"].values():
        if service.get("image") != platform_image:
            continue
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if not source.startswith("."):  # a named volume, not a file from the repository
                targets.add(target)
        home = (service.get("environment") or {}).get("DAGSTER_HOME")
        if home:
            targets.add(home)
    assert {"/var/lib/cxr", "/var/lib/cxr/dicom", "/opt/dagster/home"} <= targets
    for target in targets:
        made_there = any(path == target or path.startswith(target + "/") for path in created)
        assert made_there, f"{target} is not made in the image"
        assert any(target == top or target.startswith(top + "/") for top in owned), target
    # Kubernetes: the node's claim is made writable to the image's group.
    node = _documents()[("StatefulSet", "cxr-dicom-node")]["spec"]["template"]["spec"]
    assert str(node["securityContext"]["fsGroup"]) == user
