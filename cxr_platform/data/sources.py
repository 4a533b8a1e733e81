"""Discover labelled images in a data folder, whatever layout it uses.

Accepted layouts (checked in this order):

``labels-csv``
    ``ROOT/labels.csv`` with a ``label`` column and either a ``file`` column (path relative to
    ROOT) or a ``sop_instance_uid`` column (DICOM files anywhere under ROOT); an optional
    ``patient_id`` column. Without it the patient is the DICOM PatientID, else the file name.
``kaggle-splits``
    ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*``: every split folder present is pooled,
    because the platform makes its own patient-level split.
``class-folders``
    ``ROOT/{NORMAL,PNEUMONIA}/*``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from cxr_platform.data.imaging import read_dicom_header
from cxr_platform.data.labels import LABELS
from cxr_platform.data.patients import FALLBACK_PREFIX, patient_from_filename
from cxr_platform.errors import DatasetLayoutError, ImageReadError, LabelsFileError

log = logging.getLogger(__name__)

KAGGLE_SPLIT_FOLDERS = ("train", "val", "test")
LABELS_CSV = "labels.csv"
DICOM_SUFFIXES = {".dcm", ".dicom", ""}

LAYOUT_HELP = (
    "accepted layouts: "
    "ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/* (Kaggle, any subset of split folders); "
    "ROOT/{NORMAL,PNEUMONIA}/*; "
    "ROOT/labels.csv with columns label and file (or sop_instance_uid), optional patient_id"
)

_LABEL_ALIASES = {
    "normal": "NORMAL",
    "0": "NORMAL",
    "negative": "NORMAL",
    "false": "NORMAL",
    "pneumonia": "PNEUMONIA",
    "1": "PNEUMONIA",
    "positive": "PNEUMONIA",
    "true": "PNEUMONIA",
}

RECORD_COLUMNS = [
    "path",
    "relative_path",
    "label",
    "patient_id",
    "patient_source",
    "source_folder",
]


def normalize_label(value: object) -> str:
    """Canonical label (``NORMAL`` / ``PNEUMONIA``) from the spellings datasets use."""
    key = str(value).strip().lower()
    if key in _LABEL_ALIASES:
        return _LABEL_ALIASES[key]
    raise LabelsFileError(f"unknown label {value!r}; expected one of NORMAL, PNEUMONIA (or 0/1)")


@dataclass(frozen=True)
class ImageIndex:
    """Every labelled image found in a data folder (readable or not: the profile decides)."""

    root: Path
    layout: str
    records: pd.DataFrame  # columns: RECORD_COLUMNS

    @property
    def n_images(self) -> int:
        return len(self.records)


def discover_images(root: str | Path) -> ImageIndex:
    """Find labelled images under ``root``; raise :class:`DatasetLayoutError` if none fit."""
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DatasetLayoutError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a folder; {LAYOUT_HELP}")

    if (root / LABELS_CSV).is_file():
        layout, rows = "labels-csv", _from_labels_csv(root, root / LABELS_CSV)
    else:
        split_dirs = [
            root / name for name in KAGGLE_SPLIT_FOLDERS if _has_class_folders(root / name)
        ]
        if split_dirs:
            layout = "kaggle-splits"
            rows = [row for split_dir in split_dirs for row in _from_class_folders(root, split_dir)]
        elif _has_class_folders(root):
            layout, rows = "class-folders", list(_from_class_folders(root, root))
        else:
            raise DatasetLayoutError(f"{root} matches no known dataset layout; {LAYOUT_HELP}")

    records = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    if records.empty:
        raise DatasetLayoutError(f"{root} has the {layout} layout but contains no image files")
    records = records.sort_values("relative_path", kind="stable").reset_index(drop=True)
    return ImageIndex(root=root, layout=layout, records=records)


def _has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and any(_class_dir(folder, label) is not None for label in LABELS)


def _class_dir(folder: Path, label: str) -> Path | None:
    for child in folder.iterdir():
        if child.is_dir() and child.name.upper() == label:
            return child
    return None


def _visible_files(folder: Path) -> Iterable[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(
            part.startswith(".") for part in path.relative_to(folder).parts
        ):
            yield path


def _from_class_folders(root: Path, folder: Path) -> Iterable[dict]:
    for label in LABELS:
        class_dir = _class_dir(folder, label)
        if class_dir is None:
            continue
        for path in _visible_files(class_dir):
            identity = patient_from_filename(path.name)
            yield {
                "path": str(path),
                "relative_path": path.relative_to(root).as_posix(),
                "label": label,
                "patient_id": identity.patient_id,
                "patient_source": "filename" if identity.from_filename else "fallback",
                "source_folder": class_dir.relative_to(root).as_posix(),
            }


def _from_labels_csv(root: Path, csv_path: Path) -> list[dict]:
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        rows = list(reader)
    file_column = next((columns[c] for c in ("file", "path", "filename") if c in columns), None)
    uid_column = columns.get("sop_instance_uid") or columns.get("sopinstanceuid")
    label_column = columns.get("label")
    patient_column = columns.get("patient_id")
    if label_column is None or (file_column is None and uid_column is None):
        raise LabelsFileError(
            f"{csv_path} needs a 'label' column and a 'file' or 'sop_instance_uid' column; "
            f"found {list(columns.values())}"
        )

    uid_to_path: dict[str, Path] = {}
    if file_column is None:
        uid_to_path = _index_dicom_uids(root)

    records = []
    for line_number, row in enumerate(rows, start=2):
        try:
            label = normalize_label(row[label_column])
        except LabelsFileError as exc:
            raise LabelsFileError(f"{csv_path}:{line_number}: {exc}") from None
        if file_column is not None:
            relative = (row[file_column] or "").strip()
            if not relative:
                raise LabelsFileError(f"{csv_path}:{line_number}: empty file name")
            path = (root / relative).resolve()
            if not path.is_relative_to(root):
                raise LabelsFileError(
                    f"{csv_path}:{line_number}: {relative!r} points outside {root}"
                )
        else:
            uid = (row[uid_column] or "").strip()
            if uid not in uid_to_path:
                raise LabelsFileError(
                    f"{csv_path}:{line_number}: no DICOM file under {root} has SOPInstanceUID {uid}"
                )
            path = uid_to_path[uid]
        patient, source = _patient_for(
            path, (row.get(patient_column) or "").strip() if patient_column else ""
        )
        records.append(
            {
                "path": str(path),
                "relative_path": path.relative_to(root).as_posix(),
                "label": label,
                "patient_id": patient,
                "patient_source": source,
                "source_folder": path.parent.relative_to(root).as_posix() or ".",
            }
        )
    return records


def _patient_for(path: Path, given: str) -> tuple[str, str]:
    if given:
        return given, "csv"
    if path.suffix.lower() in DICOM_SUFFIXES and path.is_file():
        try:
            patient = str(read_dicom_header(path).get("PatientID", "") or "").strip()
        except ImageReadError:
            patient = ""
        if patient:
            return patient, "dicom"
    identity = patient_from_filename(path.name)
    if identity.from_filename:
        return identity.patient_id, "filename"
    return FALLBACK_PREFIX + path.name, "fallback"


def _index_dicom_uids(root: Path) -> dict[str, Path]:
    mapping: dict[str, Path] = {}
    for path in _visible_files(root):
        if path.name == LABELS_CSV:
            continue
        try:
            uid = str(read_dicom_header(path).get("SOPInstanceUID", "") or "")
        except ImageReadError:
            continue
        if uid:
            mapping.setdefault(uid, path)
    return mapping


def source_folder(relative_path: str) -> str:
    """The folder an image sits in, without its class folder (which is its label, not a
    source): ``test/NORMAL/x.jpeg`` -> ``test``; ``NORMAL/x.png`` -> ``.``."""
    parts = list(PurePosixPath(relative_path).parent.parts)
    parts = [part for part in parts if part.upper() not in LABELS]
    return "/".join(parts) or "."
