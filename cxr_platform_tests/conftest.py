"""Shared fixtures: a tiny synthetic dataset, the shared Kaggle folder (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_kaggle_dir() -> Path:
    """``../shared/data/kaggle-chest-xray-224`` beside the checkout.

    Override with CXR_SHARED_KAGGLE."""
    override = os.environ.get("CXR_SHARED_KAGGLE")
    if override:
        return Path(override)
    return REPO_ROOT.parent / "shared" / "data" / "kaggle-chest-xray-224"


@pytest.fixture(scope="session")
def kaggle_dir() -> Path:
    path = shared_kaggle_dir()
    if not (path / "train").is_dir():
        pytest.skip(f"shared Kaggle data not present at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """40 patients (~95 images): the smallest size where a +-5 point class-share rule is
    reliably feasible per split (each image of a 10-image split moves its share 10 points)."""
    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    return generate_synthetic_dataset(root, SyntheticSpec(n_patients=40, seed=7), progress=False)
