"""Resources: the platform settings, overridable per run from the Dagster launchpad."""

from __future__ import annotations

import dagster as dg

from cxr_platform.settings import CxrSettings, load_settings


class PlatformSettings(dg.ConfigurableResource):
    """Unset fields fall back to the ``CXR_*`` environment (see :class:`CxrSettings`)."""

    home: str | None = None
    data_dir: str | None = None
    seed: int | None = None
    workers: int | None = None
    synthetic_patients: int | None = None

    def settings(self) -> CxrSettings:
        return load_settings(
            home=self.home,
            data_dir=self.data_dir,
            seed=self.seed,
            workers=self.workers,
            synthetic_patients=self.synthetic_patients,
        )

    @classmethod
    def from_settings(cls, settings: CxrSettings) -> PlatformSettings:
        return cls(
            home=str(settings.home),
            data_dir=str(settings.data_dir) if settings.data_dir else None,
            seed=settings.seed,
            workers=settings.workers,
            synthetic_patients=settings.synthetic_patients,
        )
