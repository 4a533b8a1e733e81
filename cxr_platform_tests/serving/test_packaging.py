"""A Bento with the production version inside serves that version with no registry at all."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from cxr_platform.data.synthetic import render_radiograph
from cxr_platform.serving.packaging import PackagingError, build_bento
from cxr_platform.serving.process import REPO_ROOT, ServiceProcess
from cxr_platform.settings import load_settings


def test_bento_pins_the_production_version_and_serves_without_the_registry(live_service, tmp_path):
    built = build_bento(live_service.settings.registry)
    assert built.registry_version == live_service.production_version
    assert built.bento_tag.startswith("cxr_pneumonia:")
    assert (built.path / "bento.yaml").exists()
    bento_yaml = (built.path / "bento.yaml").read_text()
    assert built.model_tag in bento_yaml and "CXR_SERVING_MODEL" in bento_yaml

    # Serve the built Bento against an empty home: no registry, no tracking database.
    empty_home = tmp_path / "empty-home"
    env = {
        "CXR_HOME": str(empty_home),
        "BENTOML_HOME": str(built.bentoml_home),
        "CXR_SERVICE_THREADS": "1",
    }
    service = ServiceProcess(env=env, log_path=tmp_path / "bento.log", target=built.bento_tag)
    buffer = io.BytesIO()
    # A radiograph: the pinned model's input gate travels with it and refuses anything else.
    radiograph = np.rint(render_radiograph(3) * 255).astype(np.uint8)
    Image.fromarray(radiograph).save(buffer, format="PNG")
    with service:
        response = httpx.post(
            f"{service.url}/predict", files={"file": ("x.png", buffer.getvalue())}, timeout=60
        )
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == live_service.production_version
    assert not (empty_home / "mlflow").exists()


def test_packaging_without_a_production_model_is_a_clear_error(tmp_path):
    with pytest.raises(PackagingError, match="no production model"):
        build_bento(load_settings(home=tmp_path / "home").registry)


def test_plain_bentoml_build_in_the_repository_packages_the_service(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", str(REPO_ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [bento] = [
        p for p in (tmp_path / "bentoml" / "bentos" / "cxr-platform").iterdir() if p.is_dir()
    ]
    assert (bento / "src" / "cxr_platform" / "serving" / "service.py").exists()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().split()
    assert {"onnxruntime>=1.20", "bentoml>=1.4", "pandas>=2.2,<3"} <= set(requirements)
    assert "cxr_platform.serving.service:CxrService" in (bento / "bento.yaml").read_text()
