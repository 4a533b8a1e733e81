"""The shape the architecture keeps: configuration by one road, edges that do not know each other
and start light."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import cxr_platform

PACKAGE = Path(cxr_platform.__file__).resolve().parent
# What an edge that only scores must not load: training, export, quantization, plotting.
HEAVY = (
    "cxr_platform.models.training",
    "cxr_platform.models.reporting",
    "cxr_platform.deployment.export",
    "cxr_platform.deployment.quantize",
    "cxr_platform.deployment.pipeline",
    "matplotlib.pyplot",
)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_two_edges_do_not_know_each_other():
    """serving/ (HTTP) and pacs/ (DICOM) both score through inference/; neither imports the
    other, so either can run, change or fail alone."""
    for edge, other in (("serving", "pacs"), ("pacs", "serving")):
        for path in (PACKAGE / edge).rglob("*.py"):
            imported = _imports(path)
            assert not any(
                name == f"cxr_platform.{other}" or name.startswith(f"cxr_platform.{other}.")
                for name in imported
            ), f"{path.relative_to(PACKAGE)} imports from {other}/"


def _loaded_after_import(module: str, tmp_path: Path) -> set[str]:
    probe = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        env={"CXR_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_service_starts_without_torch_or_the_training_stack(tmp_path):
    """Grad-CAM (torch) loads on the first /explain; scoring needs ONNX Runtime only."""
    loaded = _loaded_after_import("cxr_platform.serving.service", tmp_path)
    assert not ({"torch", *HEAVY} & loaded), sorted({"torch", *HEAVY} & loaded)


def test_the_dicom_node_starts_without_the_training_stack(tmp_path):
    """The node loads torch only when its first SEG or SC needs Grad-CAM; never training,
    export or plots."""
    loaded = _loaded_after_import("cxr_platform.pacs.node", tmp_path)
    loaded |= _loaded_after_import("cxr_platform.pacs.processing", tmp_path)
    assert not ({"torch", *HEAVY} & loaded), sorted({"torch", *HEAVY} & loaded)


def test_no_library_module_takes_the_settings_object_or_writes_the_environment():
    """Library code takes the section it needs; only the edges read the settings, only the
    telemetry module writes os.environ, and only the Dagster shell (defs/, the CLI and the demo
    driver beside it) imports Dagster."""
    shells = ("defs/", "cli/", "cli.py", "demo/")
    entry_points = {"settings.py", "serving/service.py"}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        if relative != "telemetry.py":
            assert "os.environ[" not in text and "os.environ.setdefault" not in text, relative
        imported = _imports(path)
        if not relative.startswith(shells):
            assert not any(name.split(".")[0] == "dagster" for name in imported), relative
        if relative.startswith(shells) or relative in entry_points:
            continue
        assert "cxr_platform.settings" not in imported, relative
        if relative.startswith("models/") or relative in {
            "data/cache.py",
            "data/transforms.py",
            "data/preprocessing.py",
            "sections.py",
        }:
            assert not any(name.split(".")[0] == "pydantic" for name in imported), relative
