"""What a site's radiology reports say, as a CSV the site extracts: one row per study (or per
file), keyed by AccessionNumber, StudyInstanceUID or the file's path, labelled NORMAL or
PNEUMONIA.

Keys are hashed on reading, with the key the inference log hashes UIDs with, so neither the
joined trial nor its report holds an identifier. Nothing is guessed: an unknown class or a key
given twice is an error in the file; a key that matches no study, and a study whose rows
disagree, are counted and named by their line in the file.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cxr_platform.errors import CxrError
from cxr_platform.inference.log import LABELS
from cxr_platform.redaction import hash_uid

KEY_COLUMNS = ("accession_number", "study_instance_uid", "path")
LABEL_COLUMN = "label"


class LabelsFileError(CxrError):
    """A labels CSV that cannot be read as the site's report labels."""


@dataclass(frozen=True)
class ReportLabel:
    line: int
    column: str  # one of KEY_COLUMNS
    key_hash: str
    label: str
    # A path key as the file gives it, to say what did not match (an accession number or a
    # UID is an identifier and is kept hashed only).
    path: str | None = None


@dataclass(frozen=True)
class ReportLabels:
    labels: tuple[ReportLabel, ...]
    source: str  # the file's name, for the report


def read_report_labels(path: Path, uid_salt: bytes) -> ReportLabels:
    """Rows with a ``label`` column and exactly one of ``accession_number``,
    ``study_instance_uid`` or ``path`` filled in."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = {name.strip().lower() for name in reader.fieldnames or ()}
            rows = [
                {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelsFileError(f"{path}: cannot read the labels file ({exc})") from exc
    keys = [column for column in KEY_COLUMNS if column in columns]
    if LABEL_COLUMN not in columns or not keys:
        raise LabelsFileError(
            f"{path}: needs a '{LABEL_COLUMN}' column and one of {', '.join(KEY_COLUMNS)}"
        )
    if not rows:
        raise LabelsFileError(f"{path}: no labels in it")
    labels: list[ReportLabel] = []
    seen: dict[tuple[str, str], int] = {}
    for line, row in enumerate(rows, start=2):
        given = [column for column in keys if row.get(column)]
        if len(given) != 1:
            raise LabelsFileError(
                f"{path}, line {line}: give exactly one of {', '.join(keys)} (it has {len(given)})"
            )
        label = row.get(LABEL_COLUMN, "").upper()
        if label not in LABELS:
            raise LabelsFileError(
                f"{path}, line {line}: the label must be one of {', '.join(LABELS)}, not "
                f"{row.get(LABEL_COLUMN)!r}"
            )
        column = given[0]
        value = row[column]
        if column == "path":
            value = Path(value).as_posix()
        earlier = seen.setdefault((column, value), line)
        if earlier != line:
            raise LabelsFileError(f"{path}, line {line}: the same {column} as line {earlier}")
        key_hash = hash_uid(value, uid_salt)
        assert key_hash is not None
        labels.append(
            ReportLabel(line, column, key_hash, label, value if column == "path" else None)
        )
    return ReportLabels(tuple(labels), path.name)


@dataclass
class LabelJoin:
    """Labels by study (hashed), and what could not be joined."""

    by_study: dict[str, str] = field(default_factory=dict)
    unmatched_lines: list[int] = field(default_factory=list)
    conflicting_studies: int = 0
    conflicting_lines: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "labelled_studies": len(self.by_study),
            "unmatched_keys": len(self.unmatched_lines),
            "unmatched_lines": self.unmatched_lines[:50],
            "conflicting_studies": self.conflicting_studies,
            "conflicting_lines": self.conflicting_lines[:50],
        }


class LabelsMatchNothingError(LabelsFileError):
    """Most of a labels file's keys match no study of the trial: a mistake in how the keys are
    written, said where it is made rather than found in the report."""


# A labels file is refused when more than this share of its keys matches no study.
MOST_UNMATCHED = 0.5
_KEY_WORDS = {
    "path": "paths are matched against each image's path relative to the folder the trial "
    "scored (--images), with / between folders, e.g. 'pneumonia/0001.png'",
    "accession_number": "accession numbers against the AccessionNumber of the trial's DICOM "
    "studies",
    "study_instance_uid": "study UIDs against the StudyInstanceUID of the trial's DICOM studies",
}


def refuse_mostly_unmatched(labels: ReportLabels, join: LabelJoin) -> None:
    """Raises :class:`LabelsMatchNothingError` when most keys match no study, naming the first
    of them (paths as given, identifiers by their line only) and what keys are matched
    against."""
    unmatched = set(join.unmatched_lines)
    if len(unmatched) <= MOST_UNMATCHED * len(labels.labels):
        return
    missed = [label for label in labels.labels if label.line in unmatched]
    named = [
        f"line {label.line}: path {label.path!r}"
        if label.path is not None
        else f"line {label.line}: an {label.column.replace('_', ' ')}"
        for label in missed[:3]
    ]
    columns = sorted({label.column for label in missed})
    raise LabelsMatchNothingError(
        f"{labels.source}: {len(unmatched)} of {len(labels.labels)} labels match no study of "
        f"the trial ({'; '.join(named)}{'; ...' if len(missed) > 3 else ''}). "
        + "; ".join(_KEY_WORDS[column] for column in columns)
        + ". Nothing was labelled."
    )


def join_by_study(labels: ReportLabels, studies_by_key: dict[str, dict[str, str]]) -> LabelJoin:
    """``studies_by_key``: for each key column, hashed key -> hashed study. A study named by
    several rows (its accession number and a file of it, say) keeps its label only when they
    agree."""
    given: dict[str, list[ReportLabel]] = defaultdict(list)
    join = LabelJoin()
    for label in labels.labels:
        study = studies_by_key.get(label.column, {}).get(label.key_hash)
        if study is None:
            join.unmatched_lines.append(label.line)
        else:
            given[study].append(label)
    for study, rows in given.items():
        if len({row.label for row in rows}) == 1:
            join.by_study[study] = rows[0].label
        else:
            join.conflicting_studies += 1
            join.conflicting_lines += sorted(row.line for row in rows)
    return join
