"""A real service: ``bentoml serve`` in a child process against a registry with a production
and a shadow model (the trained and the untrained baseline from the session fixtures)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cxr_platform.deployment.pipeline import register_exported, registry_for
from cxr_platform.deployment.registry import ModelRegistry
from cxr_platform.inference.log import InferenceLog
from cxr_platform.serving.process import ServiceProcess
from cxr_platform.settings import CxrSettings, load_settings

from ..deployment.conftest import export_for_registry

API_KEY = "test-key-0123"
# Each site's own key: requests with it are logged as that site.
SITE_KEYS = {"north": "north-key-4567", "south": "south-key-8901"}
MAX_UPLOAD_MB = 2
RETAIN_INPUTS_MAX_MB = 0.25


@dataclass
class LiveService:
    url: str
    settings: CxrSettings
    registry: ModelRegistry
    production_version: str
    shadow_version: str
    log_path: Path

    def client(self, *, key: str | None = API_KEY, timeout: float = 60) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def inference_log(self) -> InferenceLog:
        return InferenceLog(self.settings.serving.inference_log_uri)


@pytest.fixture(scope="module")
def live_service(
    trained_checkpoint, untrained_checkpoint, learnable_cache, other_population, tmp_path_factory
):
    base = tmp_path_factory.mktemp("service")
    settings = load_settings(home=base / "home")
    good = export_for_registry(
        settings, trained_checkpoint, learnable_cache, base / "a", "good", other_population
    )
    bad = export_for_registry(settings, untrained_checkpoint, learnable_cache, base / "b", "bad")
    production = register_exported(settings.registry, good, triggered_by="test", shadow=False)
    shadow = register_exported(settings.registry, bad, triggered_by="test", shadow=True)
    registry = registry_for(settings.registry)
    registry.promote(production.version, triggered_by="test")
    assert registry.aliases().get("shadow") == shadow.version

    log_path = base / "service.log"
    env = {
        "CXR_HOME": str(settings.home),
        "CXR_SERVICE_API_KEY": API_KEY,
        "CXR_SERVICE_SITE_KEYS": ",".join(f"{site}={key}" for site, key in SITE_KEYS.items()),
        "CXR_SERVICE_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "CXR_SERVICE_REFRESH_SECONDS": "0.5",
        "CXR_SERVICE_THREADS": "1",
        "CXR_MAX_IMAGE_PIXELS": "20000000",
        # Room for about 28 of the test model's 96x96 inputs: the budget test fills it.
        "CXR_RETAIN_INPUTS_MAX_MB": str(RETAIN_INPUTS_MAX_MB),
    }
    with ServiceProcess(env=env, log_path=log_path) as service:
        yield LiveService(
            url=service.url,
            settings=settings,
            registry=registry,
            production_version=production.version,
            shadow_version=shadow.version,
            log_path=log_path,
        )
