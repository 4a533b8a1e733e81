"""Explore a dataset: what is there, what is broken, how patients and classes are spread.

Every file is fully decoded once (a header read misses truncated files) and hashed, so the
profile is also the source of truth for which images are usable and which are exact duplicates.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr_platform.data.imaging import DEFAULT_MAX_PIXELS, read_image
from cxr_platform.data.parallel import parallel_map
from cxr_platform.data.sources import ImageIndex
from cxr_platform.errors import ImageReadError

INSPECTION_COLUMNS = [
    "path",
    "readable",
    "reason",
    "error",
    "content_hash",
    "format",
    "width",
    "height",
    "mode",
    "bit_depth",
]


def inspect_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Decode one file; never raises for bad content: the failure becomes a reported reason."""
    result: dict[str, Any] = dict.fromkeys(INSPECTION_COLUMNS)
    result["path"] = path
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        result.update(readable=False, reason="missing", error=exc.strerror or str(exc))
        return result
    result["content_hash"] = hashlib.sha256(data).hexdigest()
    try:
        image = read_image(data, max_pixels=max_pixels)
    except ImageReadError as exc:
        result.update(readable=False, reason=exc.reason, error=exc.detail)
        return result
    result.update(
        readable=True,
        format=image.source_format,
        width=image.width,
        height=image.height,
        mode=image.mode,
        bit_depth=image.bit_depth,
    )
    return result


def inspect_images(
    index: ImageIndex,
    *,
    workers: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> pd.DataFrame:
    """The index's records joined with one inspection row per file."""
    paths = index.records["path"].tolist()
    rows = parallel_map(
        partial(inspect_image, max_pixels=max_pixels),
        paths,
        workers=workers,
        description="profiling images",
        progress=progress,
    )
    inspections = pd.DataFrame(rows, columns=INSPECTION_COLUMNS).drop(columns=["path"])
    return pd.concat([index.records.reset_index(drop=True), inspections], axis=1)


@dataclass
class DataProfile:
    root: str
    layout: str
    n_images: int
    n_readable: int
    n_unreadable: int
    n_patients: int
    n_images_without_patient_id: int
    per_class: dict[str, int]  # readable images per label
    per_class_all: dict[str, int]  # every discovered file per label
    patients_per_class: dict[str, int]
    per_source_folder: dict[str, dict[str, int]]
    images_per_patient: dict[str, float]
    images_per_patient_histogram: dict[str, int]
    patients_with_mixed_labels: int
    formats: dict[str, int]
    modes: dict[str, int]
    bit_depths: dict[str, int]
    width: dict[str, float]
    height: dict[str, float]
    aspect_ratio: dict[str, float]
    common_sizes: dict[str, int]
    unreadable: list[dict[str, str]] = field(default_factory=list)
    unreadable_reasons: dict[str, int] = field(default_factory=dict)
    duplicate_groups: int = 0
    duplicate_images: int = 0
    duplicate_groups_across_labels: int = 0
    duplicate_examples: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataProfile:
        return cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})

    @classmethod
    def read_json(cls, path: str | Path) -> DataProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False))
        tmp.replace(path)
        return path

    def to_markdown(self) -> str:
        lines = [
            f"**{self.n_images}** images ({self.n_readable} readable, {self.n_unreadable} "
            f"unreadable) from **{self.n_patients}** patients; layout `{self.layout}`.",
            "",
            "| class | readable images | patients | share |",
            "| --- | ---: | ---: | ---: |",
        ]
        for label, count in self.per_class.items():
            share = count / self.n_readable if self.n_readable else 0.0
            lines.append(
                f"| {label} | {count} | {self.patients_per_class.get(label, 0)} | {share:.1%} |"
            )
        lines += [
            "",
            "| source folder | " + " | ".join(self.per_class) + " |",
            "| --- |" + " ---: |" * len(self.per_class),
        ]
        for folder, counts in self.per_source_folder.items():
            lines.append(
                f"| {folder} | " + " | ".join(str(counts.get(k, 0)) for k in self.per_class) + " |"
            )
        ipp = self.images_per_patient
        lines += [
            "",
            f"Images per patient: min {ipp.get('min', 0):.0f}, median {ipp.get('median', 0):.0f}, "
            f"mean {ipp.get('mean', 0):.2f}, max {ipp.get('max', 0):.0f}; "
            f"{self.n_images_without_patient_id} images had no recognisable patient id "
            f"(one patient per image); {self.patients_with_mixed_labels} patients have "
            "both labels.",
            "",
            "| property | distribution |",
            "| --- | --- |",
            f"| format | {_inline(self.formats)} |",
            f"| mode | {_inline(self.modes)} |",
            f"| bit depth | {_inline(self.bit_depths)} |",
            f"| width | {_stats_inline(self.width)} |",
            f"| height | {_stats_inline(self.height)} |",
            f"| aspect (w/h) | {_stats_inline(self.aspect_ratio)} |",
            f"| commonest sizes | {_inline(self.common_sizes)} |",
            "",
            f"Exact duplicates: {self.duplicate_groups} groups covering {self.duplicate_images} "
            f"images ({self.duplicate_groups_across_labels} groups with conflicting labels).",
        ]
        if self.unreadable:
            lines += ["", "| unreadable file | reason | detail |", "| --- | --- | --- |"]
            for item in self.unreadable[:50]:
                detail = item["error"].replace("|", "\\|")[:120]
                lines.append(f"| {item['relative_path']} | {item['reason']} | {detail} |")
            if len(self.unreadable) > 50:
                lines.append(f"| ... {len(self.unreadable) - 50} more | | |")
        return "\n".join(lines)


def _inline(counts: dict[str, int]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in counts.items()) or "-"


def _stats_inline(stats: dict[str, float]) -> str:
    if not stats:
        return "-"
    return ", ".join(f"{key} {value:.3g}" for key, value in stats.items())


def _describe(values: pd.Series) -> dict[str, float]:
    values = values.dropna().astype(float)
    if values.empty:
        return {}
    return {
        "min": float(values.min()),
        "p05": float(np.percentile(values, 5)),
        "median": float(values.median()),
        "mean": float(values.mean()),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
    }


def _counts(values: pd.Series) -> dict[str, int]:
    counts = values.dropna().astype(str).value_counts()
    return {str(key): int(value) for key, value in counts.items()}


def build_profile(index: ImageIndex, inspected: pd.DataFrame) -> DataProfile:
    """Aggregate per-file inspections into the dataset profile."""
    readable = inspected[inspected["readable"].astype(bool)]
    unreadable = inspected[~inspected["readable"].astype(bool)]
    labels = sorted(inspected["label"].unique())

    per_patient = readable.groupby("patient_id")
    images_per_patient = per_patient.size()
    mixed = int((per_patient["label"].nunique() > 1).sum()) if len(readable) else 0
    histogram_bins = images_per_patient.clip(upper=5).value_counts().sort_index()
    histogram = {(f"{k}+" if k == 5 else str(k)): int(v) for k, v in histogram_bins.items()}

    folders: dict[str, dict[str, int]] = {}
    for (folder, label), count in inspected.groupby(["source_folder", "label"]).size().items():
        folders.setdefault(str(folder), {})[str(label)] = int(count)

    hashed = readable.dropna(subset=["content_hash"])
    groups = hashed.groupby("content_hash")
    sizes = groups.size()
    duplicate_hashes = sizes[sizes > 1].index
    duplicates = hashed[hashed["content_hash"].isin(duplicate_hashes)]
    across_labels = int((duplicates.groupby("content_hash")["label"].nunique() > 1).sum())
    examples = [
        sorted(group["relative_path"].tolist())
        for _, group in list(duplicates.groupby("content_hash"))[:20]
    ]

    sizes_text = (
        readable["width"].astype("Int64").astype(str)
        + "x"
        + readable["height"].astype("Int64").astype(str)
    )
    common_sizes = dict(list(_counts(sizes_text).items())[:8])

    return DataProfile(
        root=str(index.root),
        layout=index.layout,
        n_images=int(len(inspected)),
        n_readable=int(len(readable)),
        n_unreadable=int(len(unreadable)),
        n_patients=int(readable["patient_id"].nunique()),
        n_images_without_patient_id=int((readable["patient_source"] == "fallback").sum()),
        per_class={label: int((readable["label"] == label).sum()) for label in labels},
        per_class_all={label: int((inspected["label"] == label).sum()) for label in labels},
        patients_per_class={
            label: int(readable.loc[readable["label"] == label, "patient_id"].nunique())
            for label in labels
        },
        per_source_folder=folders,
        images_per_patient=_describe(images_per_patient),
        images_per_patient_histogram=histogram,
        patients_with_mixed_labels=mixed,
        formats=_counts(readable["format"]),
        modes=_counts(readable["mode"]),
        bit_depths=_counts(readable["bit_depth"].astype("Int64")),
        width=_describe(readable["width"]),
        height=_describe(readable["height"]),
        aspect_ratio=_describe(readable["width"].astype(float) / readable["height"].astype(float)),
        common_sizes=common_sizes,
        unreadable=[
            {
                "relative_path": str(row.relative_path),
                "reason": str(row.reason),
                "error": str(row.error),
            }
            for row in unreadable.itertuples()
        ],
        unreadable_reasons=_counts(unreadable["reason"]),
        duplicate_groups=int(len(duplicate_hashes)),
        duplicate_images=int(len(duplicates)),
        duplicate_groups_across_labels=across_labels,
        duplicate_examples=examples,
    )


def profile_dataset(
    index: ImageIndex,
    *,
    workers: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> tuple[DataProfile, pd.DataFrame]:
    """Inspect every image and aggregate: ``(profile, per-image inspections)``."""
    inspected = inspect_images(index, workers=workers, max_pixels=max_pixels, progress=progress)
    return build_profile(index, inspected), inspected
