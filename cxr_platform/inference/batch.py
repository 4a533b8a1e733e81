"""``cxr predict``: score files and folders into CSV, one row per file, errors in their row."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cxr_platform.errors import CxrError
from cxr_platform.inference.predictor import Predictor

CSV_COLUMNS = ("path", "probability", "label", "model_version", "error")
# Inside folders only: files named on the command line are always tried, whatever their name.
# DICOM files often have no extension at all.
FOLDER_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ""}


class InputNotFoundError(CxrError):
    pass


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders walked recursively in sorted order, hidden entries skipped."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(
                candidate
                for candidate in sorted(path.rglob("*"))
                if candidate.is_file()
                and candidate.suffix.lower() in FOLDER_SUFFIXES
                and not any(part.startswith(".") for part in candidate.relative_to(path).parts)
            )
        elif path.exists():
            files.append(path)
        else:
            raise InputNotFoundError(f"{path}: no such file or folder")
    if not files:
        raise InputNotFoundError("no image files found in the given inputs")
    return files


@dataclass
class BatchSummary:
    n_files: int = 0
    n_predicted: int = 0
    n_failed: int = 0
    n_pneumonia: int = 0


def _rows(
    predictor: Predictor, files: list[Path], batch_size: int, summary: BatchSummary
) -> Iterator[dict[str, str]]:
    for source, prediction, error in predictor.predict_many(files, batch_size=batch_size):
        summary.n_files += 1
        if prediction is None:
            summary.n_failed += 1
            reason = getattr(error, "reason", "error")
            detail = getattr(error, "detail", str(error))
            yield {
                "path": str(source),
                "probability": "",
                "label": "",
                "model_version": predictor.model_version or "",
                "error": f"{reason}: {detail}",
            }
            continue
        summary.n_predicted += 1
        summary.n_pneumonia += prediction.label == "PNEUMONIA"
        yield {
            "path": str(source),
            "probability": f"{prediction.probability:.6f}",
            "label": prediction.label,
            "model_version": prediction.model_version or "",
            "error": "",
        }


def predict_to_csv(
    predictor: Predictor, files: list[Path], out: TextIO, *, batch_size: int = 32
) -> BatchSummary:
    """Rows are written (and flushed) batch by batch: a long run can be watched and a crash
    keeps what was done."""
    summary = BatchSummary()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for count, row in enumerate(_rows(predictor, files, batch_size, summary), start=1):
        writer.writerow(row)
        if count % batch_size == 0:
            out.flush()
    out.flush()
    return summary
