"""Package the service as a Bento with the production model inside it.

A plain ``bentoml build`` in the repository (``[tool.bentoml.build]`` in pyproject.toml) gives a
Bento that follows the registry's aliases at run time. :func:`build_bento` pins a model instead:
it copies a registry version into the BentoML model store and builds a Bento whose build
arguments (and, for containers, environment) name it, so the Bento serves that exact version
with no registry access — what a hospital
deploys and audits.

BentoML reads its home (``BENTOML_HOME``) when it is first imported, so the build runs in a
child process with the platform's store (``<CXR_HOME>/bentoml``) in its environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_platform.deployment.registry import PRODUCTION, RegistryError, registry_for
from cxr_platform.errors import CxrError
from cxr_platform.model_version.files import METADATA_FILE, ONNX_FILE
from cxr_platform.sections import RegistrySection
from cxr_platform.serving.process import REPO_ROOT, SERVICE_TARGET

BENTO_NAME = "cxr_pneumonia"
PINNED_MODEL_ENV = "CXR_SERVING_MODEL"


class PackagingError(CxrError):
    pass


@dataclass(frozen=True)
class BentoBuild:
    bento_tag: str
    model_tag: str
    registry_version: str
    bentoml_home: Path
    path: Path

    def to_dict(self) -> dict[str, str]:
        return {
            "bento_tag": self.bento_tag,
            "model_tag": self.model_tag,
            "registry_version": self.registry_version,
            "bentoml_home": str(self.bentoml_home),
            "path": str(self.path),
        }

    def serve_command(self, port: int) -> str:
        return f"BENTOML_HOME={self.bentoml_home} bentoml serve {self.bento_tag} --port {port}"


def bentoml_model_name(registry_model_name: str) -> str:
    # BentoML tag names: lowercase letters, digits, '-', '_' and '.'.
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in registry_model_name.lower())


def project_dependencies() -> list[str]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as stream:
        return list(tomllib.load(stream)["project"]["dependencies"])


def build_bento(registry_settings: RegistrySection, version: str | None = None) -> BentoBuild:
    """Build a Bento pinned to ``version`` (default: the current production version)."""
    registry = registry_for(registry_settings)
    ref = version or registry.aliases().get(PRODUCTION)
    if ref is None:
        raise PackagingError("no production model to package (promote one first)")
    try:
        info = registry.get(ref)
        folder = registry.download(info.version)
    except RegistryError as exc:
        raise PackagingError(str(exc)) from exc
    request = {
        "model_name": bentoml_model_name(registry_settings.registry_model_name),
        "model_version": f"v{info.version}",
        "model_folder": str(folder),
        "registry_version": info.version,
        "registry_model_name": registry_settings.registry_model_name,
        "dependencies": project_dependencies(),
    }
    home = registry_settings.home / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop(PINNED_MODEL_ENV, None)
    completed = subprocess.run(
        [sys.executable, "-m", "cxr_platform.serving.packaging", json.dumps(request)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if completed.returncode != 0:
        raise PackagingError(f"bento build failed:\n{completed.stderr[-4000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return BentoBuild(
        bento_tag=result["bento_tag"],
        model_tag=result["model_tag"],
        registry_version=info.version,
        bentoml_home=home,
        path=Path(result["path"]),
    )


def _stated(values: Any) -> Any:
    """The metadata without its empty (None) entries, which BentoML's model store refuses; the
    model's own files, copied beside it, keep every field."""
    if isinstance(values, dict):
        return {key: _stated(value) for key, value in values.items() if value is not None}
    if isinstance(values, list):
        return [_stated(value) for value in values if value is not None]
    return values


def _build_in_this_process(request: dict) -> dict[str, str]:
    """Runs in the child: BENTOML_HOME is already the platform's store."""
    import bentoml
    from bentoml._internal.bento.build_config import BentoEnvSchema
    from bentoml.exceptions import NotFound

    model_tag = f"{request['model_name']}:{request['model_version']}"
    try:
        model = bentoml.models.get(model_tag)
    except NotFound:
        source = Path(request["model_folder"])
        with bentoml.models.create(
            model_tag,
            labels={
                "registry_model_name": request["registry_model_name"],
                "registry_version": request["registry_version"],
            },
            metadata=_stated(json.loads((source / METADATA_FILE).read_text())),
        ) as model:
            for item in source.iterdir():
                if item.is_file():
                    shutil.copy2(item, Path(model.path) / item.name)
    if not (Path(model.path) / ONNX_FILE).exists():
        raise PackagingError(f"stored model {model.tag} has no {ONNX_FILE}")
    bento = bentoml.bentos.build(
        SERVICE_TARGET,
        name=BENTO_NAME,
        labels={
            "registry_model_name": request["registry_model_name"],
            "registry_version": request["registry_version"],
        },
        description="Chest X-ray pneumonia classifier (cxr_platform), pinned model version.",
        include=["cxr_platform/**/*.py"],
        # The API takes BentoEnvSchema objects only (plain dicts fail in 1.4).
        envs=[BentoEnvSchema(name=PINNED_MODEL_ENV, value=str(model.tag))],
        models=[str(model.tag)],
        args={"model_tag": str(model.tag)},
        python={"packages": request["dependencies"], "lock_packages": False},
        build_ctx=str(REPO_ROOT),
    )
    return {"bento_tag": str(bento.tag), "model_tag": str(model.tag), "path": str(bento.path)}


if __name__ == "__main__":
    print(json.dumps(_build_in_this_process(json.loads(sys.argv[1]))))
