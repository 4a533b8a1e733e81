"""``cxr predict``: score files and folders into CSV, one row per file, errors in their row."""

from __future__ import annotations

import csv
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cxr_platform.errors import CxrError
from cxr_platform.inference.log import InferenceLog, InferenceRecord, record_from_prediction
from cxr_platform.inference.predictor import BatchItem, Predictor

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
    n_logged: int = 0


def _row(item: BatchItem, model_version: str | None) -> dict[str, str]:
    if item.prediction is None:
        error = item.error
        reason = getattr(error, "reason", "error")
        detail = getattr(error, "detail", str(error))
        return {
            "path": str(item.source),
            "probability": "",
            "label": "",
            "model_version": model_version or "",
            "error": f"{reason}: {detail}",
        }
    return {
        "path": str(item.source),
        "probability": f"{item.prediction.probability:.6f}",
        "label": item.prediction.label,
        "model_version": item.prediction.model_version or "",
        "error": "",
    }


def _log_records(items: list[BatchItem]) -> list[InferenceRecord]:
    return [
        record_from_prediction(
            item.prediction,
            request_id=uuid.uuid4().hex,
            source="batch",
            features=item.features,
        )
        for item in items
        if item.prediction is not None and item.features is not None
    ]


def predict_to_csv(
    predictor: Predictor,
    files: list[Path],
    out: TextIO,
    *,
    batch_size: int = 32,
    log: InferenceLog | None = None,
) -> BatchSummary:
    """Rows are written and flushed batch by batch, so a long run can be watched and a crash
    keeps what was done. With ``log``, every prediction is also an inference-log record
    (source ``batch``), written in one transaction per batch."""
    summary = BatchSummary()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for items in predictor.predict_many(files, batch_size=batch_size):
        for item in items:
            summary.n_files += 1
            if item.prediction is None:
                summary.n_failed += 1
            else:
                summary.n_predicted += 1
                summary.n_pneumonia += item.prediction.label == "PNEUMONIA"
            writer.writerow(_row(item, predictor.model_version))
        if log is not None:
            summary.n_logged += log.write(_log_records(items))
        out.flush()
    return summary
