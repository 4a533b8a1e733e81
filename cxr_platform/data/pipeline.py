"""The data stages as plain functions, shared by the Dagster assets and the ``cxr`` CLI."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxr_platform.data.cache import PreprocessedCache, build_cache
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.profile import DataProfile, profile_dataset
from cxr_platform.data.sources import ImageIndex, discover_images
from cxr_platform.data.splits import CheckOutcome, make_manifest, run_split_checks
from cxr_platform.data.synthetic import SyntheticSpec, generate_synthetic_dataset
from cxr_platform.errors import CxrError
from cxr_platform.settings import CxrSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfiledImages:
    """The profile plus the per-image inspections (readability, content hash) behind it."""

    profile: DataProfile
    inspected: pd.DataFrame


def resolve_data_root(settings: CxrSettings, *, progress: bool = True) -> Path:
    """The configured data folder, or the synthetic demo dataset (generated on first use)."""
    if settings.data_dir is not None:
        return settings.data_dir
    spec = SyntheticSpec(n_patients=settings.synthetic_patients, seed=settings.seed)
    root = settings.synthetic_dataset_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "no data folder configured (CXR_DATA_DIR): using the synthetic demo dataset at %s", root
    )
    return generate_synthetic_dataset(root, spec, workers=settings.workers, progress=progress)


def discover(settings: CxrSettings, *, progress: bool = True) -> ImageIndex:
    return discover_images(resolve_data_root(settings, progress=progress))


def profile(index: ImageIndex, settings: CxrSettings, *, progress: bool = True) -> ProfiledImages:
    data_profile, inspected = profile_dataset(
        index, workers=settings.workers, max_pixels=settings.max_image_pixels, progress=progress
    )
    return ProfiledImages(data_profile, inspected)


def split(
    profiled: ProfiledImages, *, ratios: Sequence[float], seed: int
) -> tuple[pd.DataFrame, dict[str, CheckOutcome]]:
    """Manifest of readable images plus the outcome of every leakage/balance check."""
    manifest = make_manifest(profiled.inspected, ratios=ratios, seed=seed)
    return manifest, run_split_checks(manifest)


def preprocessing_config(settings: CxrSettings) -> PreprocessingConfig:
    return PreprocessingConfig(image_size=settings.image_size)


def cache(
    manifest: pd.DataFrame, settings: CxrSettings, *, progress: bool = True
) -> PreprocessedCache:
    return build_cache(
        manifest,
        settings.cache_dir,
        preprocessing_config(settings),
        workers=settings.workers,
        max_pixels=settings.max_image_pixels,
        progress=progress,
    )


class SplitChecksFailedError(CxrError):
    pass


def prepare(
    settings: CxrSettings, *, progress: bool = True
) -> tuple[pd.DataFrame, PreprocessedCache]:
    """Every data stage in one call (what the CLI uses; Dagster runs them as separate assets).

    Refuses to return a cache whose split fails a leakage or balance check.
    """
    profiled = profile(discover(settings, progress=progress), settings, progress=progress)
    manifest, checks = split(profiled, ratios=settings.split_ratios, seed=settings.seed)
    failed = [name for name, outcome in checks.items() if not outcome.passed]
    if failed:
        details = "; ".join(f"{name}: {checks[name].description}" for name in failed)
        raise SplitChecksFailedError(f"split checks failed: {details}")
    return manifest, cache(manifest, settings, progress=progress)
