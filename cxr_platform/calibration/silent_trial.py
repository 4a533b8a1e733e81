"""A silent trial: a site's own recent studies scored as the site would be served, before its
first live patient, with the answers sent to no one.

The version is the one the site would get (its own ``production-site-<S>``, else
``production``), through the one scoring core: the input gate and the intended use refuse what
they refuse on every path, and every image is an inference-log row with source
``silent-trial`` and the site. Drift monitoring leaves those rows out (they are not traffic);
recalibration and fine-tuning use their labels like any other of the site's.

Work is cut by study date into partitions. Each partition is idempotent: an image's request
id is a keyed hash of the site, the version and the image, so a partition run again (after a
failure half way, or twice by mistake) reads back from the log what it already scored and
scores only the rest; its record, one JSON line per image or failed study, is replaced whole.
Nothing in a record identifies a patient: studies, accession numbers and paths are kept as the
log keeps UIDs, as keyed hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from cxr_platform.calibration.trial_sources import StudyMiss, TrialImage, TrialItem
from cxr_platform.data.patient_age import UNKNOWN, AgeReading, age_from_header
from cxr_platform.errors import CxrError, ImageReadError
from cxr_platform.inference.live import ServingModels
from cxr_platform.inference.log import SILENT_TRIAL, InferenceLog
from cxr_platform.inference.retained import RetainedInputs
from cxr_platform.inference.scoring import (
    LOG_UNAVAILABLE,
    OUTSIDE_INTENDED_USE,
    ScoreRequest,
    ScoringUnavailableError,
    request_for,
    score_and_log,
)
from cxr_platform.model_version.predictor import Predictor
from cxr_platform.redaction import hash_uid

SCORED, REFUSED, FAILED = "scored", "refused", "failed"
NOT_A_CHEST_RADIOGRAPH = "not_a_chest_radiograph"
# Bands wide enough that a band never narrows a patient down; a paediatric model's band first.
AGE_BANDS = ((0, 1, "under 1"), (1, 6, "1-5"), (6, 18, "6-17"), (18, 65, "18-64"), (65, 200, "65+"))


class TrialError(CxrError):
    """The partition cannot be recorded (no version to score with, the log unwritable)."""


@dataclass(frozen=True)
class TrialRow:
    """One image, or one study that could not be retrieved, as the trial keeps it."""

    partition: str
    study: str  # keyed hash of the Study Instance UID (or of the file, for a PNG)
    outcome: str  # SCORED, REFUSED or FAILED
    request_id: str | None = None
    accession: str | None = None  # keyed hash
    path: str | None = None  # keyed hash of the path in an exported folder
    reason: str | None = None  # REFUSED: not_a_chest_radiograph / outside_intended_use
    detail: str | None = None  # REFUSED: the check that refused; FAILED: what went wrong
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    model_version: str | None = None
    modality: str | None = None
    manufacturer: str | None = None
    view: str | None = None
    age_band: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialRow:
        known = {spec.name for spec in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def age_band(reading: AgeReading) -> str | None:
    if reading.years is None:
        return None
    return next(name for low, high, name in AGE_BANDS if low <= reading.years < high)


def _header_facts(data: bytes) -> dict[str, Any]:
    """What the report cuts by, from a DICOM header (nothing for PNG or JPEG)."""
    if data[128:132] != b"DICM":
        return {}
    from cxr_platform.data.imaging import read_dicom_header

    try:
        header = read_dicom_header(data)
    except ImageReadError:
        return {}

    def text(keyword: str) -> str | None:
        value = str(header.get(keyword, "") or "").strip()
        return value or None

    return {
        "accession_raw": text("AccessionNumber"),
        "modality": text("Modality"),
        "manufacturer": text("Manufacturer"),
        "view": text("ViewPosition"),
        "age_band": age_band(age_from_header(header)),
    }


def site_folder_name(site: str) -> str:
    """A site name as a folder: readable, and unique (two names that read alike differ)."""
    slug = re.sub(r"[^\w.-]+", "_", site).strip("._") or "site"
    return f"{slug[:40]}-{hashlib.sha256(site.encode()).hexdigest()[:8]}"


@dataclass
class PartitionSummary:
    partition: str
    images: int = 0
    scored: int = 0
    refused: int = 0
    failed: int = 0
    resumed: int = 0  # already in the log from an earlier run of this partition

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SiteTrial:
    """A trial of one version at one site, and where it keeps its partitions."""

    site: str
    predictor: Predictor
    log: InferenceLog
    uid_salt: bytes
    folder: Path  # trials_root(home) / site / v<version>
    max_pixels: int
    retained: RetainedInputs | None = None
    batch_size: int = 16

    def request_id(self, key: str) -> str:
        message = "\0".join((self.site, str(self.predictor.model_version), key)).encode()
        return "trial-" + hmac.new(self.uid_salt, message, hashlib.sha256).hexdigest()[:40]

    def partition_file(self, partition: str) -> Path:
        return self.folder / "partitions" / f"{partition}.jsonl"

    def run_partition(self, partition: str, items: Iterable[TrialItem]) -> PartitionSummary:
        """Score one partition's images in batches (memory bounded by the batch) and replace
        its record."""
        rows: list[TrialRow] = []
        batch: list[TrialImage] = []
        resumed = 0
        for item in items:
            if isinstance(item, StudyMiss):
                rows.append(
                    TrialRow(
                        partition,
                        self._hash(item.study) or "",
                        FAILED,
                        reason=item.reason,
                        detail=item.detail,
                    )
                )
                continue
            batch.append(item)
            if len(batch) >= self.batch_size:
                scored, already = self._score(partition, batch)
                rows.extend(scored)
                resumed, batch = resumed + already, []
        scored, already = self._score(partition, batch)
        rows.extend(scored)
        resumed += already
        self._write(partition, rows)
        summary = PartitionSummary(partition, resumed=resumed)
        for row in rows:
            summary.images += row.request_id is not None  # a failed study is no image
            setattr(summary, row.outcome, getattr(summary, row.outcome) + 1)
        return summary

    def _hash(self, value: str | None) -> str | None:
        return hash_uid(value, self.uid_salt)

    def _score(self, partition: str, batch: list[TrialImage]) -> tuple[list[TrialRow], int]:
        """The batch's rows, and how many of them an earlier run had already scored."""
        if not batch:
            return [], 0
        ids = [self.request_id(image.key) for image in batch]
        done = self._already_scored(ids)
        rows: list[TrialRow | None] = [None] * len(batch)
        pending: list[tuple[int, ScoreRequest]] = []
        models = ServingModels(self.predictor, None)
        for position, (image, request_id) in enumerate(zip(batch, ids, strict=True)):
            facts = _header_facts(image.data)
            base = TrialRow(
                partition,
                self._hash(image.study) or "",
                FAILED,
                request_id=request_id,
                accession=self._hash(facts.pop("accession_raw", None)),
                path=self._hash(image.path),
                **facts,
            )
            if request_id in done:
                rows[position] = replace(base, **done[request_id])
                continue
            try:
                request = request_for(
                    models,
                    image.data,
                    max_pixels=self.max_pixels,
                    uid_salt=self.uid_salt,
                    started=time.perf_counter(),
                    source=SILENT_TRIAL,
                    site=self.site,
                    patient_age=UNKNOWN,
                )
            except ImageReadError as exc:
                # Its request id names the image in the record; the log has no row for it.
                rows[position] = replace(base, reason=exc.reason, detail=exc.detail)
                continue
            except ScoringUnavailableError as exc:
                raise TrialError(f"no version to score with: {exc}") from exc
            pending.append((position, replace(request, request_id=request_id)))
            rows[position] = base
        outcomes = score_and_log(self.log, [request for _, request in pending], self.retained)
        for (position, _), outcome in zip(pending, outcomes, strict=True):
            base = rows[position]
            assert base is not None
            if outcome.failure == LOG_UNAVAILABLE:
                raise TrialError(
                    "the inference log cannot be written; nothing of this partition is recorded "
                    "as done: run it again"
                )
            if outcome.production is not None:
                prediction = outcome.production
                rows[position] = replace(
                    base,
                    outcome=SCORED,
                    probability=float(prediction.probability),
                    label=prediction.label,
                    threshold=float(prediction.threshold),
                    model_version=prediction.model_version,
                )
            elif outcome.refused and outcome.refusal is not None:
                rows[position] = replace(
                    base,
                    outcome=REFUSED,
                    reason=outcome.failure,
                    detail=outcome.refusal.reason,
                    model_version=self.predictor.model_version,
                )
            else:
                rows[position] = replace(base, reason=outcome.failure or "not_scored")
        return [row for row in rows if row is not None], len(done)

    def _already_scored(self, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        for row in self.log.records(request_ids=request_ids).itertuples():
            done[row.request_id] = {
                "outcome": SCORED,
                "probability": float(row.probability),
                "label": row.label,
                "threshold": float(row.threshold),
                "model_version": row.model_version,
            }
        for row in self.log.refusals(request_ids=request_ids).itertuples():
            intended_use = row.reason == OUTSIDE_INTENDED_USE
            done[row.request_id] = {
                "outcome": REFUSED,
                "reason": OUTSIDE_INTENDED_USE if intended_use else NOT_A_CHEST_RADIOGRAPH,
                # "patient_age: ..." for intended use; the gate's own reason otherwise
                "detail": str(row.detail).split(":", 1)[0] if intended_use else row.reason,
                "model_version": row.model_version,
            }
        return done

    def _write(self, partition: str, rows: list[TrialRow]) -> None:
        target = self.partition_file(partition)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with partial.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(asdict(row), sort_keys=True) + "\n")
        partial.replace(target)


def trial_rows(folder: Path, partitions: Iterable[str] | None = None) -> pd.DataFrame:
    """The recorded rows of a trial's partitions (all of them, or those named)."""
    wanted = None if partitions is None else set(partitions)
    frames: list[dict[str, Any]] = []
    for path in sorted((folder / "partitions").glob("*.jsonl")):
        if wanted is not None and path.stem not in wanted:
            continue
        frames += [json.loads(line) for line in _lines(path)]
    columns = [spec.name for spec in fields(TrialRow)]
    return pd.DataFrame(frames, columns=columns)


def _lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        yield from (line for line in handle if line.strip())
