"""Group "data": source_images -> data_profile -> patient_splits -> preprocessed_cache."""
# No `from __future__ import annotations`: Dagster inspects these annotations at runtime.

import dagster as dg
import pandas as pd

from cxr_platform.data import pipeline
from cxr_platform.data.cache import PreprocessedCache
from cxr_platform.data.pipeline import ProfiledImages
from cxr_platform.data.sources import ImageIndex
from cxr_platform.data.splits import (
    check_both_classes_per_split,
    check_class_balance,
    check_no_content_leakage,
    check_no_patient_leakage,
    manifest_hash,
    split_summary,
    write_manifest,
)
from cxr_platform.defs.metadata import home_path, readable
from cxr_platform.defs.resources import PlatformSettings
from cxr_platform.terminal import interactive

GROUP = "data"


@dg.asset(group_name=GROUP, kinds={"python"})
def source_images(
    context: dg.AssetExecutionContext, platform: PlatformSettings
) -> dg.Output[ImageIndex]:
    """Every labelled image in the configured data folder (the synthetic set when none is set)."""
    index = pipeline.discover(platform.settings().data, progress=interactive())
    counts = index.records["label"].value_counts().to_dict()
    context.log.info("found %d images (%s) in %s", index.n_images, counts, index.root)
    return dg.Output(
        index,
        metadata={
            "root": home_path(index.root, platform.settings().data.home),
            "layout": index.layout,
            "n_images": index.n_images,
            **{f"n_{label.lower()}": int(n) for label, n in counts.items()},
        },
    )


@dg.asset(group_name=GROUP, kinds={"python"})
def data_profile(
    context: dg.AssetExecutionContext, platform: PlatformSettings, source_images: ImageIndex
) -> dg.Output[ProfiledImages]:
    """Sizes, modes, class balance, patients, unreadable files and exact duplicates."""
    data = platform.settings().data
    profiled = pipeline.profile(source_images, data, progress=interactive())
    report = profiled.profile
    json_path = report.write_json(data.reports_dir / "data_profile.json")
    for item in report.unreadable:
        context.log.warning(
            "unreadable: %s (%s: %s)", item["relative_path"], item["reason"], item["error"]
        )
    return dg.Output(
        profiled,
        metadata={
            "profile": dg.MetadataValue.md(report.to_markdown()),
            "json": home_path(json_path, data.home),
            "n_images": report.n_images,
            "n_unreadable": report.n_unreadable,
            "n_patients": report.n_patients,
            "duplicate_groups": report.duplicate_groups,
        },
    )


@dg.asset(group_name=GROUP, kinds={"python"})
def patient_splits(
    context: dg.AssetExecutionContext,
    platform: PlatformSettings,
    data_profile: ProfiledImages,
) -> dg.Output[pd.DataFrame]:
    """Patient-level, label-stratified train/val/test manifest (path,label,patient_id,split).

    Ratios and seed are the platform's ``split_ratios`` and ``seed`` (``CXR_SPLIT_RATIOS``,
    ``CXR_SEED``, or the ``platform`` resource in the launchpad), as for ``cxr split``."""
    data = platform.settings().data
    manifest, _ = pipeline.split(data_profile, ratios=data.split_ratios, seed=data.seed)
    csv_path = write_manifest(manifest, data.splits_dir / "patient_splits.csv")
    summary = split_summary(manifest)
    return dg.Output(
        manifest,
        metadata={
            "summary": dg.MetadataValue.md(summary.to_markdown(index=False, floatfmt=".3f")),
            "manifest": home_path(csv_path, data.home),
            "manifest_hash": manifest_hash(manifest),
            "seed": data.seed,
            "ratios": dg.MetadataValue.json(list(data.split_ratios)),
            **{f"n_{row.split}": int(row.images) for row in summary.itertuples()},
        },
    )


def _split_check(name: str, check, description: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=patient_splits, name=name, blocking=True, description=description)
    def _run(patient_splits: pd.DataFrame) -> dg.AssetCheckResult:
        outcome = check(patient_splits)
        return dg.AssetCheckResult(
            passed=outcome.passed,
            description=outcome.description,
            metadata=readable(outcome.metadata),
        )

    return _run


split_checks = [
    _split_check(
        "no_patient_leakage", check_no_patient_leakage, "No patient appears in more than one split."
    ),
    _split_check(
        "no_content_leakage",
        check_no_content_leakage,
        "No identical image (content hash) appears in more than one split.",
    ),
    _split_check(
        "both_classes_in_every_split",
        check_both_classes_per_split,
        "Every split holds both NORMAL and PNEUMONIA images.",
    ),
    _split_check(
        "class_share_balanced",
        check_class_balance,
        "Each split's pneumonia share is within 5 points of the overall share.",
    ),
]


@dg.asset(group_name=GROUP, kinds={"numpy"})
def preprocessed_cache(
    context: dg.AssetExecutionContext, platform: PlatformSettings, patient_splits: pd.DataFrame
) -> dg.Output[PreprocessedCache]:
    """uint8 224x224 arrays per split (memory-mappable), reused when the input is unchanged."""
    data = platform.settings().data
    cache = pipeline.cache(patient_splits, data, progress=interactive())
    rows = "\n".join(
        f"| {s.split} | {s.n_images} | {'reused' if s.reused else 'built'} "
        f"| `{s.images_path.name}` |"
        for s in cache.splits.values()
    )
    return dg.Output(
        cache,
        metadata={
            "splits": dg.MetadataValue.md(
                "| split | images | status | file |\n| --- | ---: | --- | --- |\n" + rows
            ),
            "root": home_path(cache.root, data.home),
            "preprocessing": dg.MetadataValue.json(cache.preprocessing),
            "reused_all": all(s.reused for s in cache.splits.values()),
        },
    )


data_assets = [source_images, data_profile, patient_splits, preprocessed_cache]


def build_data_definitions() -> dg.Definitions:
    return dg.Definitions(assets=data_assets, asset_checks=split_checks)
