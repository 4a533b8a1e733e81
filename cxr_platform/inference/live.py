"""Production and shadow predictors that follow the registry's aliases, without a restart.

A request takes one :class:`ServingModels` snapshot and uses it to the end, so an alias move
never mixes two versions inside a request, and a swap never interrupts one: the new predictor
is loaded (downloaded, session created) *before* the single reference assignment that publishes
it, and the old one lives until the last request holding it finishes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr_platform.deployment.registry import PRODUCTION, SHADOW, ModelRegistry
from cxr_platform.model_version.aliases import site_production_alias
from cxr_platform.model_version.files import INT8_ONNX_FILE
from cxr_platform.model_version.lung_fields import LungFieldModel, LungFields
from cxr_platform.model_version.predictor import Predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingModels:
    production: Predictor | None
    shadow: Predictor | None
    # Sites with their own production version (recalibrated for them): each a snapshot whose
    # production is that version, built once per refresh so requests of one site share it.
    sites: Mapping[str, ServingModels] = field(default_factory=dict)
    # The lung segmentation version in production, where one is registered: it draws the lung
    # fields an explanation's relevance is measured against. Shared by every site.
    lung_fields: LungFieldModel | None = None

    @property
    def lung_fields_version(self) -> str | None:
        return self.lung_fields.model_version if self.lung_fields else None

    def fields_of(self, pixels: np.ndarray, scored_by: Predictor) -> LungFields | None:
        """The lung fields of a square ``scored_by`` prepared, on its grid; None without a
        lung fields version, or with one whose square is not this classifier's."""
        lung = self.lung_fields
        if lung is None or not lung.fits(scored_by.preprocessing):
            return None
        return lung.fields(pixels)[0]

    @property
    def versions(self) -> dict[str, str | None]:
        versions = {
            PRODUCTION: self.production.model_version if self.production else None,
            SHADOW: self.shadow.model_version if self.shadow else None,
        }
        for site, models in self.sites.items():
            versions[site_production_alias(site)] = models.production_version
        return versions

    @property
    def production_version(self) -> str | None:
        return self.production.model_version if self.production else None

    def for_site(self, site: str | None) -> ServingModels:
        """The snapshot a request from ``site`` is scored by: the site's own production
        version where it has one, else ``production``."""
        if site is None:
            return self
        return self.sites.get(site, self)


class LiveModels:
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        threads: int | None = None,
        max_pixels: int | None = None,
        precision: str = "fp32",
        lung_registry: ModelRegistry | None = None,
    ) -> None:
        """``lung_registry``: the lung segmentation version's registered model; its production
        version is loaded beside the classifiers (none registered: no lung fields)."""
        self.registry = registry
        self.lung_registry = lung_registry
        self.threads = threads
        self.max_pixels = max_pixels
        self.precision = precision
        self._snapshot = ServingModels(None, None)
        self._refresh_lock = threading.Lock()  # one loader at a time; readers never wait
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self, site: str | None = None) -> ServingModels:
        return self._snapshot.for_site(site)

    def _load(self, version: str) -> Predictor:
        folder = self.registry.download(version)
        options = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        precision = self.precision
        if precision == "int8" and not (folder / INT8_ONNX_FILE).exists():
            # The export keeps INT8 only when it holds validation AUC; serve fp32 otherwise.
            log.warning("version %s has no INT8 model; serving it in fp32", version)
            precision = "fp32"
        return Predictor(
            folder, model_version=version, threads=self.threads, precision=precision, **options
        )

    def _lung_fields(self, current: LungFieldModel | None) -> LungFieldModel | None:
        """The lung segmentation version production points at now. A registry or download
        failure keeps the one already loaded: lung fields must never stop the classifiers
        from following their own aliases."""
        if self.lung_registry is None:
            return None
        try:
            version = self.lung_registry.aliases().get(PRODUCTION)
            if version is None:
                return None
            if current is not None and current.model_version == version:
                return current
            return LungFieldModel(
                self.lung_registry.download(version), model_version=version, threads=self.threads
            )
        except Exception:
            log.exception("could not load the lung fields version; keeping %s", current)
            return current

    def refresh(self) -> bool:
        """Load whatever the aliases point at now; True when anything changed."""
        with self._refresh_lock:
            aliases = self.registry.aliases()
            production = aliases.get(PRODUCTION)
            shadow = aliases.get(SHADOW)
            if shadow == production:
                shadow = None  # shadow scoring the production model adds nothing
            site_versions = self.registry.site_productions()
            old = self._snapshot
            loaded = {
                p.model_version: p
                for p in (
                    old.production,
                    old.shadow,
                    *(models.production for models in old.sites.values()),
                )
                if p is not None
            }
            for version in (production, shadow, *site_versions.values()):
                if version is not None and version not in loaded:
                    loaded[version] = self._load(version)
            shadow_model = loaded.get(shadow)
            lung = self._lung_fields(old.lung_fields)
            new = ServingModels(
                loaded.get(production),
                shadow_model,
                {
                    site: ServingModels(loaded[version], shadow_model, lung_fields=lung)
                    for site, version in sorted(site_versions.items())
                },
                lung_fields=lung,
            )
            if (new.versions, new.lung_fields_version) == (old.versions, old.lung_fields_version):
                return False
            self._snapshot = new  # the only publication point: one atomic reference store
            log.info(
                "serving models %s -> %s (lung fields %s -> %s)",
                old.versions,
                new.versions,
                old.lung_fields_version,
                new.lung_fields_version,
            )
            return True

    def start_polling(self, interval_seconds: float) -> None:
        """Refresh in a daemon thread; a failed refresh keeps the models already loaded."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_seconds):
                try:
                    self.refresh()
                except Exception:  # registry unreachable, download failed, ...
                    log.exception("model refresh failed; still serving %s", self.current().versions)

        self._thread = threading.Thread(target=loop, name="cxr-model-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class FixedModels:
    """One model that never changes (a Bento's bundled model): the :class:`LiveModels`
    interface without a registry, so the service code is the same in both modes."""

    def __init__(self, folder: Path, *, version: str, threads: int | None = None) -> None:
        self.folder = folder
        self._snapshot = ServingModels(
            Predictor(folder, model_version=version, threads=threads), None
        )

    def current(self, site: str | None = None) -> ServingModels:
        return self._snapshot

    def refresh(self) -> bool:
        return False

    def start_polling(self, interval_seconds: float) -> None:
        pass

    def stop(self) -> None:
        pass
