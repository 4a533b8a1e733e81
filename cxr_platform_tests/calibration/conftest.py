"""A home whose production version is the synthetic test model, for the site tests."""

from __future__ import annotations

import os

import pytest

from cxr_platform.deployment.pipeline import register_exported, registry_for
from cxr_platform.settings import load_settings
from cxr_platform_tests.deployment.conftest import export_for_registry


@pytest.fixture()
def site_home(tmp_path, trained_checkpoint, learnable_cache, other_population):
    """A home whose production version is the synthetic test model (for children of 1-5)."""
    settings = load_settings(home=tmp_path / "home")
    exported = export_for_registry(
        settings, trained_checkpoint, learnable_cache, tmp_path / "x", "cxr", other_population
    )
    info = register_exported(settings.registry, exported, triggered_by="test", shadow=False)
    registry_for(settings.registry).promote(info.version, triggered_by="test")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env["CXR_HOME"] = str(settings.home)
    return settings, info, env
