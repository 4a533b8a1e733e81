"""``cxr predict``: score files and folders into CSV, one row per file, errors in their row."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from cxr_platform.data.patient_age import UNKNOWN, AgeReading, InvalidAgeError, age_from_caller
from cxr_platform.errors import CxrError, ImageReadError
from cxr_platform.inference.live import ServingModels
from cxr_platform.inference.log import InferenceLog
from cxr_platform.inference.scoring import ScoreRequest, request_for, score_and_log, score_items
from cxr_platform.model_version.predictor import Prediction, Predictor
from cxr_platform.terminal import progress_stream

CSV_COLUMNS = ("path", "probability", "label", "model_version", "error")
# Inside folders only: files named on the command line are always tried, whatever their name.
# DICOM files often have no extension at all.
FOLDER_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ""}


class InputNotFoundError(CxrError):
    pass


class AgesFileError(CxrError):
    """An ages CSV that cannot be read as ``path,patient_age`` rows."""


AGE_COLUMNS = ("path", "patient_age")


def read_ages_csv(path: Path) -> dict[Path, AgeReading]:
    """``path,patient_age`` rows -> the age of each file (resolved; a relative path is relative
    to the CSV's folder). Ages are years or DICOM age strings; an empty age is unknown. A file
    named twice, a missing column or an age that does not read as one is an error, not a
    guess."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            columns = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AgesFileError(f"{path}: cannot read the ages file ({exc})") from exc
    if not rows or not set(AGE_COLUMNS) <= columns:
        raise AgesFileError(f"{path}: needs the columns {', '.join(AGE_COLUMNS)} and some rows")
    ages: dict[Path, AgeReading] = {}
    for line, row in enumerate(rows, start=2):
        named = Path((row["path"] or "").strip())
        if not str(named) or str(named) == ".":
            raise AgesFileError(f"{path}, line {line}: no path")
        target = (named if named.is_absolute() else path.parent / named).resolve()
        if target in ages:
            raise AgesFileError(f"{path}, line {line}: {named} is named twice")
        try:
            ages[target] = age_from_caller(row["patient_age"])
        except InvalidAgeError as exc:
            raise AgesFileError(f"{path}, line {line}: {exc}") from exc
    return ages


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
    # Images the version refused, by why: not_a_chest_radiograph, outside_intended_use.
    refused: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _error_row(path: Path, reason: str, detail: str, model_version: str | None) -> dict[str, str]:
    return {
        "path": str(path),
        "probability": "",
        "label": "",
        "model_version": model_version or "",
        "error": f"{reason}: {detail}",
    }


def _prediction_row(path: Path, prediction: Prediction) -> dict[str, str]:
    return {
        "path": str(path),
        "probability": f"{prediction.probability:.6f}",
        "label": prediction.label,
        "model_version": prediction.model_version or "",
        "error": "",
    }


def predict_to_csv(
    predictor: Predictor,
    files: list[Path],
    out: TextIO,
    *,
    batch_size: int = 32,
    log: InferenceLog | None = None,
    uid_salt: bytes = b"",
    site: str | None = None,
    progress: bool = False,
    ages: dict[Path, AgeReading] | None = None,
) -> BatchSummary:
    """Score through the scoring core, as the service and the DICOM node do.

    Rows are written and flushed batch by batch, so a long run can be watched and a crash keeps
    what was done. With ``log``, every prediction is also an inference-log record (source
    ``batch``), written in one transaction per batch; a batch the log refuses gets its error in
    its rows instead of predictions. ``uid_salt`` hashes DICOM UIDs as the other sources do;
    ``site`` is where the images come from, kept in the log. ``ages``: patient ages by
    resolved file path, for images whose own header says none (PNG, JPEG). ``progress`` draws
    a bar on the terminal (``terminal.progress_stream``); the rows go wherever ``out`` is.
    """
    ages = ages or {}
    summary = BatchSummary()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    models = ServingModels(predictor, None)  # the version asked for, whatever its alias
    version = predictor.model_version
    bar = tqdm(
        total=len(files), desc="scoring", unit="img", disable=not progress, file=progress_stream()
    )
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        rows: list[dict[str, str] | None] = [None] * len(chunk)
        requests: dict[int, ScoreRequest] = {}  # by position: a file may be named twice
        for position, path in enumerate(chunk):
            try:
                requests[position] = request_for(
                    models,
                    _read(path),
                    max_pixels=predictor.max_pixels,
                    uid_salt=uid_salt,
                    started=time.perf_counter(),
                    source="batch",
                    site=site,
                    patient_age=ages.get(path.resolve(), UNKNOWN),
                )
            except ImageReadError as exc:
                rows[position] = _error_row(path, exc.reason, exc.detail, version)
        items = list(requests.values())
        outcomes = score_and_log(log, items) if log is not None else score_items(items)
        for position, outcome in zip(requests, outcomes, strict=True):
            prediction = outcome.production
            if outcome.refused and outcome.failure is not None:
                summary.refused[outcome.failure] = summary.refused.get(outcome.failure, 0) + 1
            if prediction is None:
                reason = outcome.failure or "error"
                detail = outcome.refusal.describe() if outcome.refusal else "not scored"
                rows[position] = _error_row(chunk[position], reason, detail, version)
                continue
            rows[position] = _prediction_row(chunk[position], prediction)
            summary.n_predicted += 1
            summary.n_pneumonia += prediction.label == "PNEUMONIA"
            summary.n_logged += log is not None
        for row in rows:
            assert row is not None
            summary.n_files += 1
            summary.n_failed += bool(row["error"])
            writer.writerow(row)
        out.flush()
        bar.update(len(chunk))
    bar.close()
    return summary


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"cannot read file: {exc.strerror or exc}", source=str(path)) from exc
