"""The accelerator machine's entry point runs with only the packages that machine has.

The device has a fixed set of Python packages and no registry to install more; anything else the
training code imports at module level would fail there after minutes of start-up. Here the entry
point runs end to end on a tiny set in an interpreter whose only site-packages is a folder of
links to the device's distributions, so anything else is missing exactly as it is there.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from .conftest import REPO_ROOT

# The Python distributions the device image holds, from the `device` entry's KINDS.md (read
# 2026-11-30). Their own requirements are there too (pip installed them with them).
DEVICE_DISTRIBUTIONS_LISTED = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_distributions() -> set[str]:
    """The device's distributions and, recursively, what they require (canonical names)."""
    wanted = {_canonical(name) for name in DEVICE_DISTRIBUTIONS_LISTED.split()}
    queue = list(wanted)
    while queue:
        try:
            requires = metadata.distribution(queue.pop()).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            name = _canonical(requirement.name)
            if name not in wanted:
                wanted.add(name)
                queue.append(name)
    return wanted


def device_site_packages(folder: Path) -> Path:
    """A site-packages holding only the device's distributions (links to the ones installed
    here)."""
    folder.mkdir()
    wanted = device_distributions()
    for dist in metadata.distributions():
        if _canonical(dist.metadata["Name"]) not in wanted:
            continue
        for entry in {file.parts[0] for file in dist.files or []}:
            if entry in ("..", "__pycache__") or entry.endswith(".pth"):
                continue
            source, link = Path(dist.locate_file(entry)), folder / entry
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return folder


def run_as_on_the_device(site: Path, *args: str) -> subprocess.CompletedProcess:
    # -S: no site-packages but the device's; the project itself is on PYTHONPATH, as there.
    env = {"PYTHONPATH": f"{REPO_ROOT}:{site}", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-S", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_the_device_recipe_trains_and_evaluates_with_only_the_devices_packages(
    tiny_synthetic, tmp_path
):
    site = device_site_packages(tmp_path / "site-packages")
    out = tmp_path / "row.json"
    result = run_as_on_the_device(
        site,
        str(REPO_ROOT / "benchmarks" / "device_recipe.py"),
        str(tiny_synthetic),
        *("--arch", "baseline_cnn", "--profile", "demo", "--epochs", "1", "--size", "64"),
        *("--workers", "1", "--device", "cpu", "--out", str(out)),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    row = json.loads(out.read_text())
    assert row["arch"] == "baseline_cnn" and row["epochs_run"] == 1
    assert sum(row["n_images"].values()) > 80
    assert 0.0 <= row["test"]["auc"] <= 1.0
    assert {score["shift"] for score in row["shifted_test"]} >= {"contrast", "noise"}
    assert row["wall_seconds"]["cache_to_evaluation"] > 0


def test_what_the_device_lacks_is_missing_there(tmp_path):
    """The emulation itself: the platform's settings need pydantic-settings, which the device
    does not have, and the decoder imports without pydicom."""
    site = device_site_packages(tmp_path / "site-packages")
    refused = run_as_on_the_device(site, "-c", "import cxr_platform.settings")
    assert refused.returncode != 0
    assert "No module named 'pydantic_settings'" in refused.stderr
    for module in ("pydicom", "mlflow", "dagster", "bentoml"):
        probe = run_as_on_the_device(site, "-c", f"import {module}")
        assert probe.returncode != 0, f"{module} must be missing in the device's emulation"
    decoder = run_as_on_the_device(site, "-c", "import cxr_platform.data.imaging")
    assert decoder.returncode == 0, decoder.stderr[-2000:]
    # The throughput benchmark the device script runs first imports there too.
    throughput = run_as_on_the_device(
        site, str(REPO_ROOT / "benchmarks" / "train_throughput.py"), "-h"
    )
    assert throughput.returncode == 0, throughput.stderr[-2000:]
