"""The data stages as plain functions, shared by the Dagster assets and the ``cxr`` CLI."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxr_platform.data.cache import PreprocessedCache, build_cache
from cxr_platform.data.lung_masks import LungMaskCache, build_mask_cache
from cxr_platform.data.preprocessing import PreprocessingConfig
from cxr_platform.data.profile import DataProfile, profile_dataset
from cxr_platform.data.sources import ImageIndex, discover_images
from cxr_platform.data.splits import CheckOutcome, make_manifest, run_split_checks
from cxr_platform.data.synthetic import (
    LUNG_MASK_FOLDER,
    SyntheticSpec,
    generate_synthetic_dataset,
)
from cxr_platform.errors import CxrError
from cxr_platform.sections import DataSection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfiledImages:
    """The profile plus the per-image inspections (readability, content hash) behind it."""

    profile: DataProfile
    inspected: pd.DataFrame


def resolve_data_root(data: DataSection, *, progress: bool = True) -> Path:
    """The configured data folder, or the synthetic demo dataset (generated on first use)."""
    if data.data_dir is not None:
        return data.data_dir
    spec = SyntheticSpec(n_patients=data.synthetic_patients, seed=data.seed)
    root = data.synthetic_dataset_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "no data folder configured (CXR_DATA_DIR): using the synthetic demo dataset at %s", root
    )
    return generate_synthetic_dataset(root, spec, workers=data.workers, progress=progress)


def discover(data: DataSection, *, progress: bool = True) -> ImageIndex:
    return discover_images(resolve_data_root(data, progress=progress))


def profile(index: ImageIndex, data: DataSection, *, progress: bool = True) -> ProfiledImages:
    data_profile, inspected = profile_dataset(
        index, workers=data.workers, max_pixels=data.max_image_pixels, progress=progress
    )
    return ProfiledImages(data_profile, inspected)


def split(
    profiled: ProfiledImages, *, ratios: Sequence[float], seed: int
) -> tuple[pd.DataFrame, dict[str, CheckOutcome]]:
    """Manifest of readable images plus the outcome of every leakage/balance check."""
    manifest = make_manifest(profiled.inspected, ratios=ratios, seed=seed)
    return manifest, run_split_checks(manifest)


def preprocessing_config(data: DataSection) -> PreprocessingConfig:
    return PreprocessingConfig(image_size=data.image_size)


def cache(manifest: pd.DataFrame, data: DataSection, *, progress: bool = True) -> PreprocessedCache:
    return build_cache(
        manifest,
        data.cache_dir,
        preprocessing_config(data),
        workers=data.workers,
        max_pixels=data.max_image_pixels,
        progress=progress,
    )


class SplitChecksFailedError(CxrError):
    pass


def prepare(data: DataSection, *, progress: bool = True) -> tuple[pd.DataFrame, PreprocessedCache]:
    """Every data stage in one call (what the CLI uses; Dagster runs them as separate assets).

    Refuses to return a cache whose split fails a leakage or balance check.
    """
    profiled = profile(discover(data, progress=progress), data, progress=progress)
    manifest, checks = split(profiled, ratios=data.split_ratios, seed=data.seed)
    failed = [name for name, outcome in checks.items() if not outcome.passed]
    if failed:
        details = "; ".join(f"{name}: {checks[name].description}" for name in failed)
        raise SplitChecksFailedError(f"split checks failed: {details}")
    return manifest, cache(manifest, data, progress=progress)


def lung_mask_root(data: DataSection) -> Path | None:
    """Where the lung-field masks of the data in use are (None: no segmentation version)."""
    if data.lung_mask_dir is not None:
        return data.lung_mask_dir
    if data.data_dir is None:
        return data.synthetic_dataset_dir() / LUNG_MASK_FOLDER
    return None


def lung_masks(
    cache: PreprocessedCache, data: DataSection, *, progress: bool = True
) -> LungMaskCache | None:
    """The masks of the cache's images, row for row (None where no mask folder is configured)."""
    root = lung_mask_root(data)
    if root is None:
        return None
    return build_mask_cache(
        {split: cache.index(split) for split in cache.splits},
        root,
        data.cache_dir,
        PreprocessingConfig.from_dict(cache.preprocessing),
        workers=data.workers,
        progress=progress,
    )
